"""The global sample order: a seeded permutation per epoch, identical on every machine.

The order is an endless sequence of epochs, each a fresh permutation of the split's samples, so
a data position is one integer: the global sample index ``g`` (epoch ``g // n``, offset
``g % n``). Optimizer step ``s`` of a run with a fixed global batch ``B`` takes ``[s*B, (s+1)*B)``
of that sequence, whatever the number of ranks; nothing is dropped at epoch ends (a step may
span two epochs).

The permutation sorts the samples by a SplitMix64 hash of (seed, epoch, index) instead of using
a library RNG, whose streams may change between numpy/torch versions: a run resumed on another
machine must see exactly the same order.

Skipped ranges (:class:`SkipRanges`: ``data.skip_ranges`` and the ranges rollbacks add) are
ranges of global indices the loader steps over: a step takes the next ``B`` indices that are not
skipped, so the position stays one global index (now "the next index to consider"), and adding a
range ahead of the position changes only what comes after it.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on a uint64 array (multiplications wrap mod 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _mix64_int(z: int) -> int:
    return int(_mix64(np.array([z & MASK64], dtype=np.uint64))[0])


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``range(num_samples)`` (int64), determined by (seed, epoch) alone."""
    base = _mix64_int(_mix64_int(seed) ^ (epoch * GOLDEN))
    with np.errstate(over="ignore"):
        states = np.uint64(base) + np.arange(1, num_samples + 1, dtype=np.uint64) * np.uint64(
            GOLDEN
        )
        keys = _mix64(states)
    return np.argsort(keys, kind="stable").astype(np.int64)


class GlobalOrder:
    """Maps global sample indices to sample ids of the split (shuffled per epoch, or in file
    order when ``shuffle`` is off). Keeps the two most recent epoch permutations."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool) -> None:
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            n = self.num_samples
            perm = epoch_permutation(n, self.seed, epoch) if self.shuffle else np.arange(n)
            self._cache[epoch] = perm
        return self._cache[epoch]

    def sample_ids(self, start: int, count: int) -> np.ndarray:
        """Sample ids at global indices ``[start, start + count)``."""
        out, k, stop = [], start, start + count
        while k < stop:
            epoch, offset = divmod(k, self.num_samples)
            take = min(stop - k, self.num_samples - offset)
            out.append(self._perm(epoch)[offset : offset + take])
            k += take
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


class SkipRanges:
    """Sorted, merged, half-open ranges ``[start, end)`` of global indices that are never read."""

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        merged: list[list[int]] = []
        for a, b in sorted((int(a), int(b)) for a, b in ranges):
            if b <= a:
                continue
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.ranges: tuple[tuple[int, int], ...] = tuple((a, b) for a, b in merged)
        self._starts = [a for a, _ in self.ranges]

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def next_kept(self, pos: int) -> int:
        """The first index >= ``pos`` that is not skipped."""
        i = bisect_right(self._starts, pos) - 1
        if i >= 0 and pos < self.ranges[i][1]:
            return self.ranges[i][1]
        return pos

    def segments(self, pos: int, count: int) -> list[tuple[int, int]]:
        """The next ``count`` kept indices from ``pos`` on, as runs ``[a, b)`` in order."""
        out: list[tuple[int, int]] = []
        pos = self.next_kept(pos)
        while count > 0:
            i = bisect_right(self._starts, pos)  # the first range after pos (pos is kept)
            limit = self.ranges[i][0] if i < len(self.ranges) else pos + count
            take = min(count, limit - pos)
            out.append((pos, pos + take))
            count -= take
            pos = self.next_kept(pos + take)
        return out

    def end_after(self, pos: int, count: int) -> int:
        """The index just after the last of the next ``count`` kept indices from ``pos``."""
        return self.segments(pos, count)[-1][1] if count > 0 else self.next_kept(pos)

    def advance(self, pos: int, count: int) -> int:
        """The position after taking ``count`` kept indices from ``pos``: the next kept index."""
        return self.next_kept(self.end_after(pos, count))

    def covers(self, start: int, end: int) -> bool:
        """Whether every index of ``[start, end)`` is skipped."""
        return start >= end or self.next_kept(start) >= end

    def sample_ids(self, order: GlobalOrder, pos: int, count: int) -> np.ndarray:
        """Sample ids of the next ``count`` kept global indices from ``pos``."""
        parts = [order.sample_ids(a, b - a) for a, b in self.segments(pos, count)]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
