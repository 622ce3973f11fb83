"""grain pipelines that feed the trainer.

Recommendation examples are tiny (a few ints), so per-record Python work would bound
throughput at thousands of examples/s. Instead one grain record is one whole batch: the
record index ``k`` selects epoch ``k // batches_per_epoch`` and a contiguous slice of that
epoch's permutation, and the batch is gathered with one vectorised numpy take per column.
grain still provides prefetching and a checkpointable iterator state (the index of the next
batch), so resuming a run yields exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import threading

import grain
import numpy as np

from jaxreco.data.prepare import load_split


class _BatchAt:
    """Maps a global batch index to a dict of numpy column batches."""

    def __init__(self, cols: dict[str, np.ndarray], batch_size: int, batches_per_epoch: int,
                 seed: int, shuffle: bool, shard_index: int, shard_count: int):
        self.cols = cols
        self.n = len(next(iter(cols.values())))
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.shuffle = shuffle
        self.local = batch_size // shard_count
        self.offset = shard_index * self.local
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def _perm(self, epoch: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        with self._lock:
            p = self._perms.get(epoch)
            if p is None:
                rng = np.random.default_rng([self.seed, epoch])
                p = rng.permutation(self.n).astype(np.int64)
                self._perms = {e: v for e, v in self._perms.items() if e >= epoch - 1}
                self._perms[epoch] = p
            return p

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        epoch, b = divmod(int(k), self.batches_per_epoch)
        start = b * self.batch_size + self.offset
        perm = self._perm(epoch)
        if perm is None:
            sl = slice(start, start + self.local)
            return {name: c[sl] for name, c in self.cols.items()}
        idx = perm[start:start + self.local]
        return {name: c[idx] for name, c in self.cols.items()}


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches in one epoch (the remainder is dropped; the next epoch reshuffles)."""
    return num_examples // batch_size


def train_dataset(cols: dict[str, np.ndarray], *, batch_size: int, num_epochs: int, seed: int,
                  shuffle: bool = True, shard_index: int = 0, shard_count: int = 1,
                  prefetch: int = 4) -> grain.IterDataset:
    """An epoch-shuffled stream of global batches, of which this process reads its shard.

    Args:
      cols: equal-length numpy columns (e.g. ``user``, ``item``, ``rating``).
      batch_size: global batch size; each of ``shard_count`` processes gets
        ``batch_size // shard_count`` rows of every global batch, so the union over processes
        is the same global batch a single process would see.
      num_epochs: length of the stream in epochs.
      seed: the permutation of epoch ``e`` is a function of ``(seed, e)`` only.
    """
    n = len(next(iter(cols.values())))
    if batch_size % shard_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by {shard_count} processes")
    nb = batches_per_epoch(n, batch_size)
    if nb == 0:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} training examples")
    fn = _BatchAt(cols, batch_size, nb, seed, shuffle, shard_index, shard_count)
    ds = grain.MapDataset.range(num_epochs * nb).map(fn)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))


def eval_batches(cols: dict[str, np.ndarray], batch_size: int):
    """Sequential fixed-size batches over all rows; the last one is padded.

    Yields ``(batch, num_valid)``; padding rows repeat row 0 and must be masked with
    ``arange(batch_size) < num_valid``. Fixed shapes mean one compilation.
    """
    n = len(next(iter(cols.values())))
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        idx = np.arange(start, start + batch_size)
        idx[stop - start:] = 0
        yield {k: v[idx] for k, v in cols.items()}, stop - start


def load_prepared_columns(path: str, split: str = "train",
                          columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """Numpy columns of a split written by ``jaxreco.data.prepare`` (all shards, in order),
    ready for :func:`train_dataset` / :func:`eval_batches`.

    ``split`` is ``train``/``val``/``test`` or ``val_candidates``/``test_candidates`` (the
    fixed evaluation negatives: ``user``, ``item`` and a 2-D ``negatives`` column).
    Columns come back contiguous, so each batch is one vectorised gather per column.
    """
    cols = load_split(path, split, columns)
    return {k: np.ascontiguousarray(v) for k, v in cols.items()}
