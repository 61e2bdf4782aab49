"""Protocol metrics for many cases, inline or in a process pool, with identical results.

Cases are independent, so :class:`CaseMetricsPool` hands each to a worker process as soon as it is
submitted (CPU metrics then overlap with GPU inference in the caller) and returns the rows sorted by
case then class, whatever the number of workers or the order in which cases finish.

Moving a 100 x 512 x 512 volume to a worker through a pipe costs about as much as evaluating it, so
before sending, label maps are reduced to their compact integer form (uint8 for up to 255 classes; a
float32 Synapse label or an int64 map shrinks 4-8x) and large arrays travel through POSIX shared memory
(one copy in, the worker maps it, the parent frees it when the result is back). When shared memory is unavailable or
``/dev/shm`` is short of space (small Docker default), arrays are pickled instead; results are the same.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import multiprocessing
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from samora_pl.errors import SamoraError
from samora_pl.evaluation.metrics import _as_label_map, case_metrics, sort_rows

__all__ = ["CaseMetricsPool", "evaluate_cases"]

_SHM_MIN_BYTES = 1 << 20  # smaller arrays are simply pickled


def _case_task(case: Any, pred: Any, label: Any, num_classes: int, spacing: Any) -> list[dict]:
    return [{"case": case, **row} for row in case_metrics(pred, label, num_classes, spacing)]


# --------------------------------------------------------------------------------------------------
# Shared-memory transport
# --------------------------------------------------------------------------------------------------
class _ShmRef:
    """A picklable handle to an array placed in shared memory by the parent."""

    def __init__(self, name: str, shape: tuple, dtype: str):
        self.name, self.shape, self.dtype = name, shape, dtype


def _shm_space_ok(nbytes: int) -> bool:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return os.name != "posix"  # no /dev/shm on this platform: let SharedMemory decide
    # Writing past a full tmpfs raises SIGBUS rather than an error, so check first, with headroom.
    return st.f_bavail * st.f_frsize > 2 * nbytes + (64 << 20)


def _to_shared(array: np.ndarray, blocks: list) -> Any:
    """``array`` as a shared-memory handle (its block appended to ``blocks``), or the array itself."""
    if array.nbytes < _SHM_MIN_BYTES or not _shm_space_ok(array.nbytes):
        return array
    try:
        from multiprocessing.shared_memory import SharedMemory

        block = SharedMemory(create=True, size=array.nbytes)
    except (ImportError, OSError, ValueError):
        return array
    blocks.append(block)
    np.ndarray(array.shape, array.dtype, buffer=block.buf)[...] = array
    return _ShmRef(block.name, array.shape, array.dtype.str)


def _release(blocks: list) -> None:
    for block in blocks:
        try:
            block.close()
            block.unlink()
        except (FileNotFoundError, BufferError, OSError):
            pass


def _shared_case_task(case: Any, pred: Any, label: Any, num_classes: int, spacing: Any) -> list[dict]:
    """Worker side: map shared-memory handles, evaluate, unmap."""
    from multiprocessing.shared_memory import SharedMemory

    blocks, arrays = [], []
    try:
        for item in (pred, label):
            if isinstance(item, _ShmRef):
                block = SharedMemory(name=item.name)
                blocks.append(block)
                arrays.append(np.ndarray(item.shape, np.dtype(item.dtype), buffer=block.buf))
            else:
                arrays.append(item)
        return _case_task(case, arrays[0], arrays[1], num_classes, spacing)
    finally:
        arrays.clear()  # drop the views before unmapping
        for block in blocks:
            with contextlib.suppress(BufferError):
                block.close()


def _default_context() -> str:
    # forkserver: workers start from a clean, single-threaded server process (safe inside a process
    # that already runs torch / CUDA threads, unlike fork) and import only numpy / scipy.
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


# --------------------------------------------------------------------------------------------------
# Public
# --------------------------------------------------------------------------------------------------
class CaseMetricsPool:
    """Evaluates cases as they arrive, inline (``workers <= 1``) or in a process pool.

    Submit a case as soon as its prediction exists, then call :meth:`rows`. At most ``max_pending``
    cases wait in the pool at once (default ``2 * workers``) so memory stays bounded. Results are
    identical for any ``workers``. ``mp_context`` is a multiprocessing start method (default
    ``forkserver`` where available, else ``spawn``).

    >>> with CaseMetricsPool(num_classes=8, workers=2) as pool:   # doctest: +SKIP
    ...     for case, pred, label in volumes:
    ...         pool.submit(case, pred, label)
    ...     rows = pool.rows()
    """

    def __init__(
        self,
        num_classes: int,
        workers: int = 1,
        *,
        max_pending: int | None = None,
        mp_context: str | None = None,
    ):
        if int(workers) != workers:
            raise SamoraError(f"workers must be an integer, got {workers!r}")
        self.num_classes = int(num_classes)
        self.workers = max(int(workers), 1)
        self.max_pending = max_pending or 2 * self.workers
        self._rows: list[dict] = []
        self._pending: dict[futures.Future, list] = {}  # future -> its shared-memory blocks
        self._cases: set = set()
        self._executor = None
        if self.workers > 1:
            ctx = multiprocessing.get_context(mp_context or _default_context())
            self._executor = futures.ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx)

    def submit(self, case: Any, pred: Any, label: Any, spacing: Any = None) -> None:
        """Queue one case: (D, H, W) prediction and label (numpy arrays or CPU tensors), optional spacing."""
        if case in self._cases:
            raise SamoraError(f"case {case!r} was submitted twice; case ids must be unique")
        self._cases.add(case)
        if self._executor is None:
            self._rows.extend(_case_task(case, pred, label, self.num_classes, spacing))
            return
        while len(self._pending) >= self.max_pending:
            done, _ = futures.wait(list(self._pending), return_when=futures.FIRST_COMPLETED)
            self._collect(done)
        # Compact label maps here (user errors surface in the caller, and fewer bytes travel).
        pred_arr = np.ascontiguousarray(_as_label_map(pred, "prediction", self.num_classes, compact=True))
        label_arr = np.ascontiguousarray(_as_label_map(label, "label", self.num_classes, compact=True))
        blocks: list = []
        try:
            refs = (_to_shared(pred_arr, blocks), _to_shared(label_arr, blocks))
            fut = self._executor.submit(_shared_case_task, case, *refs, self.num_classes, spacing)
        except BaseException:
            _release(blocks)
            raise
        self._pending[fut] = blocks

    def _collect(self, done: Iterable[futures.Future]) -> None:
        for fut in done:
            blocks = self._pending.pop(fut)
            try:
                self._rows.extend(fut.result())  # re-raises a worker's error here
            finally:
                _release(blocks)

    def rows(self) -> list[dict]:
        """All rows so far (waits for pending cases), sorted by case then class."""
        while self._pending:
            done, _ = futures.wait(list(self._pending), return_when=futures.FIRST_COMPLETED)
            self._collect(done)
        return sort_rows(self._rows)

    def close(self) -> None:
        """Stop the workers (pending cases are cancelled or waited for) and free shared memory."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        for blocks in self._pending.values():
            _release(blocks)
        self._pending.clear()

    def __enter__(self) -> CaseMetricsPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def evaluate_cases(
    cases: Iterable[tuple],
    num_classes: int,
    workers: int = 1,
    *,
    mp_context: str | None = None,
) -> list[dict]:
    """Protocol rows for many cases: ``(case, pred, label)`` or ``(case, pred, label, spacing)`` tuples.

    ``cases`` may be a generator (consumed lazily). Returns one dict per (case, class) with keys
    ``case, class_id, dice, hd95[, hd95_mm]``, sorted by case then class; identical for any ``workers``.
    """
    with CaseMetricsPool(num_classes, workers, mp_context=mp_context) as pool:
        for item in cases:
            if len(item) not in (3, 4):
                raise SamoraError("each case must be (case, pred, label) or (case, pred, label, spacing)")
            pool.submit(*item)
        return pool.rows()
