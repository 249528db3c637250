"""Peak resident memory while a block runs (sampled from /proc; torch allocations are invisible to tracemalloc)."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from collections.abc import Iterator


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: fall back to the process-lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Samples RSS every `interval` seconds in a thread; `.peak_mb` after the block."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak_mb = 0.0
        self.seconds = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb())
            time.sleep(self.interval)


@contextmanager
def track(interval: float = 0.05) -> Iterator[PeakMemory]:
    """`with track() as m: ...` then m.peak_mb (MB) and m.seconds (wall time)."""
    meter = PeakMemory(interval)
    meter.peak_mb = rss_mb()
    thread = threading.Thread(target=meter._sample, daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        yield meter
    finally:
        meter._stop.set()
        thread.join()
        meter.peak_mb = max(meter.peak_mb, rss_mb())
        meter.seconds = time.perf_counter() - start
