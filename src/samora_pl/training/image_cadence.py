"""When a stage puts its picture (views, reconstructions, segmentation panels) in TensorBoard.

A picture is drawn by a hook that runs on some epochs only: a training step runs every epoch, validation
only every `trainer.check_val_every_n_epoch` epochs, at epochs n-1, 2n-1, ... Testing `epoch % every_n == 0`
there draws nothing when both intervals are equal (validation at 19, 39, ... and pictures at 0, 20, ...), so
the cadence counts from the last picture instead: the first time the hook runs, then again once `every_n`
epochs have passed, whatever epochs the hook happens to run on.
"""

from collections.abc import Iterable


class ImageCadence:
    def __init__(self, every_n_epochs: int = 1):
        self.every_n = max(int(every_n_epochs), 1)
        self.last: int | None = None

    def due(self, epoch: int) -> bool:
        """True (and remembered) when a hook running in `epoch` should draw its picture."""
        if self.last is not None and epoch - self.last < self.every_n:
            return False
        self.last = int(epoch)
        return True


def picture_epochs(hook_epochs: Iterable[int], every_n_epochs: int) -> list[int]:
    """The epochs that get a picture when the drawing hook runs on `hook_epochs` (config checks, tests)."""
    cadence = ImageCadence(every_n_epochs)
    return [epoch for epoch in hook_epochs if cadence.due(epoch)]


def validation_epochs(max_epochs: int, check_val_every_n_epoch: int) -> list[int]:
    """The epochs Lightning validates in: the last of every `check_val_every_n_epoch` epochs."""
    every = max(int(check_val_every_n_epoch), 1)
    return [epoch for epoch in range(max_epochs) if (epoch + 1) % every == 0]
