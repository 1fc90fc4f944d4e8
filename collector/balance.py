"""Keep-alive connections spread evenly over the collector's worker processes.

The kernel gives each new connection to whichever worker accepts it first, and a host keeps its
connection for as long as it uploads. So a first uneven split held for good: bench/collector saw
two workers split 8 hosts about 6 to 2, and the one with 6 queued their batches behind its one
writing thread while the other idled (writes split 87/35: runs like that ingested 15,800 to
19,800 events/s, balanced ones 21,900 to 24,200). Each worker counts its open connections in a
table shared by all (one slot each, written only by its owner); a worker holding more than its
share asks the host it has just answered to reconnect (`Connection: close`), and the next
connection goes to whichever worker takes it. Balanced workers never do: a reconnection costs
a TLS handshake.
"""
from __future__ import annotations

import mmap
import struct

_SLOT = struct.Struct("q")


class Loads:
    """Open connections per worker, in memory shared across fork()."""

    def __init__(self, workers: int):
        self.workers = workers
        self._mem = mmap.mmap(-1, _SLOT.size * workers)

    def counts(self) -> list[int]:
        return [_SLOT.unpack_from(self._mem, i * _SLOT.size)[0] for i in range(self.workers)]

    def add(self, index: int, n: int) -> None:
        at = index * _SLOT.size
        _SLOT.pack_into(self._mem, at, _SLOT.unpack_from(self._mem, at)[0] + n)

    def slot(self, index: int) -> "Slot":
        return Slot(self, index)


class Slot:
    """One worker's entry: only that worker writes it (from its event loop's thread)."""

    def __init__(self, loads: Loads, index: int):
        self.loads, self.index = loads, index

    def opened(self) -> None:
        self.loads.add(self.index, 1)

    def closed(self) -> None:
        self.loads.add(self.index, -1)

    def over_share(self) -> bool:
        """More open connections than an even split gives each worker (rounded up)."""
        counts = self.loads.counts()
        share = -(-sum(counts) // len(counts))
        return counts[self.index] > share


# This process's slot, when it is one of several workers (set by collector.serve).
slot: Slot | None = None
