"""Run by test_datamodule_base.py in a subprocess: a 2-process DDP (gloo) fit on a Synapse-layout folder that
writes, per rank and epoch, the names of the training slices that rank was given.

    python -m tests.data_modules.ddp_record_slices <root> <out folder> <fraction>
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from data_modules.labelled.synapse import SynapseDataModule


class RecordSlices(L.LightningModule):
    def __init__(self, out: Path):
        super().__init__()
        self.out = out
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, _):
        self.seen.extend(batch["name"])
        return self.weight * batch["image"].mean()

    def on_train_epoch_end(self):
        path = self.out / f"rank{self.global_rank}_epoch{self.current_epoch}.json"
        path.write_text(json.dumps(self.seen))
        self.seen = []

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(root: str, out: str, fraction: str) -> None:
    out = Path(out)
    data = SynapseDataModule(
        root, img_size=16, batch_size=2, fraction=float(fraction), val_slices=0, split_dir=out / "splits"
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(RecordSlices(out), datamodule=data)
    if torch.distributed.is_initialized():  # before the interpreter's teardown, which can abort a gloo rank
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
