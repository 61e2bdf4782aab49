"""Print each stage run's training throughput and peak CUDA memory from its TensorBoard scalars.

Reads `perf/images_per_s` (the last logged value: the first interval holds warm-up and kernel
selection) and `perf/peak_memory_gib` (the largest; absent on CPU) of every event folder under
`<runs>/<run>/tb/<stage>/<sub>` and prints `name: value` lines, e.g.
`images_per_s_s512_distill_patch: 41.3`. Used by gpu_check.sh.

    python benchmarks/perf_summary.py RUNS_DIR
"""

import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(folder: Path) -> dict:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def main(runs: Path) -> int:
    found = 0
    for folder in sorted({p.parent for p in runs.glob("*/tb/*/*/events.out.tfevents.*")}):
        run, stage, sub = folder.parts[-4], folder.parts[-2], folder.parts[-1]
        values = scalars(folder)
        name = f"{run}_{stage}_{sub}"
        if values.get("perf/images_per_s"):
            print(f"images_per_s_{name}: {values['perf/images_per_s'][-1]:.1f}")
            found += 1
        if values.get("perf/peak_memory_gib"):
            print(f"peak_memory_gib_{name}: {max(values['perf/peak_memory_gib']):.2f}")
    if not found:
        print(f"no perf/images_per_s scalars under {runs}", file=sys.stderr)
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
