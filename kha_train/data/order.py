"""The global sample order: a seeded permutation per epoch, identical on every machine.

The order is an endless sequence of epochs, each a fresh permutation of the split's samples, so
a data position is one integer: the global sample index ``g`` (epoch ``g // n``, offset
``g % n``). Optimizer step ``s`` of a run with a fixed global batch ``B`` takes ``[s*B, (s+1)*B)``
of that sequence, whatever the number of ranks; nothing is dropped at epoch ends (a step may
span two epochs).

The permutation sorts the samples by a SplitMix64 hash of (seed, epoch, index) instead of using
a library RNG, whose streams may change between numpy/torch versions: a run resumed on another
machine must see exactly the same order.
"""

from __future__ import annotations

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
