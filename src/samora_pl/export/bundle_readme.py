"""The bundle's `docs/README.md` (what it is, how to run it, how to serve it with MONAI Label) and its LICENSE."""

from __future__ import annotations

from pathlib import Path

import samora_pl
from samora_pl.export.bundle_configs import BundleFacts, channel_def

APACHE_URL = "https://www.apache.org/licenses/LICENSE-2.0"


def bundle_readme(facts: BundleFacts) -> str:
    labels = "\n".join(f"| {k} | {name} |" for k, name in channel_def(facts).items())
    size = facts.img_size
    return f"""# samora_{facts.dataset}_{facts.tag}

A SAMora fine-tune exported by samora_pl {samora_pl.__version__} (`samora bundle`) from run `{facts.run}`,
fine-tune `{facts.tag}`: {facts.family} {facts.variant} encoder, mode={facts.mode}, fusion {facts.fusion},
decoder {facts.decoder}. It needs MONAI, PyTorch, numpy, scipy and nibabel; not samora_pl.

## What it does

For each NIfTI volume (`*.nii.gz`, `*.nii` in `dataset_dir`; `*_segmentation.*` skipped):

1. intensity `{facts.intensity}` to [0, 1] (`none`: clip; `ct_window`: HU window [-125, 275];
   `mr_percentile`: the volume's 0.5 / 99.5 percentiles), as in training;
2. every slice along the volume's last axis resized to {size}x{size} with `scipy.ndimage.zoom(order=3)`
   (resize protocol `{facts.resize}`), labelled by `models/model.ts` ({facts.batch_size} slices per call;
   logits upsampled bilinearly to {size}, softmax, argmax), and resized back with nearest neighbour;
3. the label volume written as `<case>_pred.nii.gz` in `output_dir`, in the input's geometry.

These are the steps of `samora predict` for NIfTI inputs; samora_pl's tests compare the two label maps.

| label | class |
|---|---|
{labels}

## Run

```bash
python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
    --dataset_dir /path/to/volumes --output_dir /path/to/predictions [--device cuda] [--intensity none]
```

`models/model.ts` takes `[N, 1, {size}, {size}]` float32 slices in [0, 1] and returns `[N, {size}, {size}]`
uint8 labels; `torch.jit.load` is all it needs. Traced on the CPU and tested there; `--device cuda` moves it
to a GPU (not tested).

## Serve it into 3D Slicer with MONAI Label

```bash
pip install monailabel
monailabel apps --download --name monaibundle --output apps
mkdir -p apps/monaibundle/model && cp -r . apps/monaibundle/model/samora_{facts.dataset}_{facts.tag}
monailabel start_server --app apps/monaibundle --studies /path/to/volumes \\
    --conf models samora_{facts.dataset}_{facts.tag}
```

Then in 3D Slicer's MONAI Label module connect to http://127.0.0.1:8000, pick the model and press Run.

## Licence

Apache-2.0 (LICENSE). The weights derive from Meta's Segment Anything (Apache-2.0) and the run's training
data, whose own terms apply. Research use only; not a medical device.
"""


def license_text() -> str:
    """The repository's Apache-2.0 LICENSE when samora_pl runs from a checkout, else a pointer to the text."""
    here = Path(samora_pl.__file__).resolve().parents[2] / "LICENSE"
    if here.is_file() and "Apache License" in here.read_text()[:400]:
        return here.read_text()
    return (
        'Copyright (c) SAMora authors\n\nLicensed under the Apache License, Version 2.0 (the "License"); you may not '
        f"use these files except in compliance with the License. You may obtain a copy of the License at\n\n    "
        f"{APACHE_URL}\n\nUnless required by applicable law or agreed to in writing, software distributed under the "
        'License is distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express '
        "or implied. See the License for the specific language governing permissions and limitations under the "
        "License.\n"
    )
