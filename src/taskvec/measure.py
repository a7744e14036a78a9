"""What a run costs: peak resident memory of a stretch of code, and the time of one training step.

Why VmHWM and not ``ru_maxrss``: ``ru_maxrss`` survives ``exec`` and is never reset, so a child of a
large parent (a pytest worker) reports the parent's size. VmHWM can be reset to the current size
(``/proc/self/clear_refs``, value 5), so one process can measure several runs one after another.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from taskvec.train import Batch, LossFn

__all__ = ["PeakMemory", "peak_memory", "rss_mib", "time_step"]


def _status(key: str) -> float | None:
    """A ``/proc/self/status`` field in MiB, or None where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB (peak from ``ru_maxrss`` without /proc)."""
    current, peak = _status("VmRSS"), _status("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return (peak if current is None else current), peak


def _reset_peak() -> bool:
    """Set VmHWM to the current resident size; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    """Resident memory around a stretch of code: at the start, at the peak, and whether the peak was reset
    at the start (if not, ``peak_mib`` may come from before the stretch)."""

    start_mib: float = 0.0
    peak_mib: float = 0.0
    reset: bool = False

    @property
    def added_mib(self) -> float:
        """How far the peak rose above the resident size at the start."""
        return self.peak_mib - self.start_mib

    def to_dict(self) -> dict[str, float | bool]:
        return {"start_mib": self.start_mib, "peak_mib": self.peak_mib, "added_mib": self.added_mib,
                "reset": self.reset}


@contextmanager
def peak_memory() -> Iterator[PeakMemory]:
    """``with peak_memory() as memory: ...``, then ``memory.peak_mib`` / ``memory.added_mib``."""
    gc.collect()
    record = PeakMemory(reset=_reset_peak())
    record.start_mib = rss_mib()[0]
    try:
        yield record
    finally:
        record.peak_mib = rss_mib()[1]


def time_step(model: nn.Module, loss_fn: LossFn, batch: Batch, *, repeats: int = 3, warmup: int = 1,
              clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds of one forward + backward of ``loss_fn(model, batch)`` (gradients are then cleared).

    The optimiser update is left out: for coefficient learning it is negligible next to composing the
    weights and running the network.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    times = []
    for index in range(warmup + repeats):
        model.zero_grad(set_to_none=True)
        tic = clock()
        loss_fn(model, batch).backward()
        elapsed = clock() - tic
        if index >= warmup:
            times.append(elapsed)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)
