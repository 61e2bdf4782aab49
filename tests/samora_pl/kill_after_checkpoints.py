"""`python kill_after_checkpoints.py K SAMORA-ARGS...`: run `samora SAMORA-ARGS` and SIGKILL this process the
moment its K-th checkpoint is on disk, the way a crash or a pre-empted job stops a stage (no clean-up, no
final save), but at a chosen point rather than at a racy one. Used by the resume tests in a subprocess.

Under DDP only global rank zero writes checkpoints, and the other ranks are its children in its process group.
Started as the leader of a process group of its own (`start_new_session=True`), it kills the whole group, every
rank at once, the way a scheduler ends a job; otherwise only itself, never the test that started it."""

import os
import signal
import sys

from samora_pl.cli import main
from samora_pl.records.checkpoint_io import AtomicCheckpointIO


def kill_after(count: int) -> None:
    save = AtomicCheckpointIO.save_checkpoint
    saved = []

    def save_then_die(self, *args, **kwargs):
        save(self, *args, **kwargs)
        saved.append(1)
        if len(saved) == count:
            if os.getpgid(0) == os.getpid():
                os.killpg(os.getpid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)

    AtomicCheckpointIO.save_checkpoint = save_then_die


if __name__ == "__main__":
    kill_after(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
