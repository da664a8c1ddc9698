"""A length-grouped, distributed batch sampler that can never make ranks disagree.

Horovod hangs when one rank runs one more step than another (each step is an allreduce).
So the number of batches per epoch is computed from the *global* example count alone,
identically on every rank, and each rank pads its own shard by repeating a few of its
examples to reach it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np


def padded_shard_size(total: int, world: int) -> int:
    """Rows per rank after evening out, for strided sharding of `total` rows."""
    return math.ceil(total / world)


def shard_size(total: int, rank: int, world: int) -> int:
    """Examples owned by `rank` under strided sharding (example i belongs to i % world)."""
    return len(range(rank, total, world))


class DistributedBatchSampler:
    """Yields lists of local indices (into this rank's shard) for one epoch.

    `per_rank` is the same number on every rank: the largest shard's row count
    (`padded_shard_size`), so every rank runs the same number of steps.

    - every rank yields the same number of batches (`len(self)`), for any shard sizes;
    - across ranks each row is used once per epoch, plus the repeats that fill the
      shorter shards up to `per_rank` (one at most under plain strided sharding);
    - with `group_by_length`, examples of similar length share a batch (little padding),
      within "mega-batches" of `mega_factor` batches so the order stays random;
    - the order depends only on (seed, epoch, rank): reruns and resumes replay it exactly.

    `shuffle=False, group_by_length=False` keeps input order; then rank r's k-th batch
    holds global examples k*B*world ... (k+1)*B*world - 1 that are ≡ r (mod world),
    which is what makes an N-rank step equal a 1-rank step with N times the batch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        per_rank: int,
        rank: int,
        world: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        group_by_length: bool = True,
        seed: int = 42,
        mega_factor: int = 50,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 < len(lengths) <= per_rank:
            raise ValueError(f"rank {rank} holds {len(lengths)} rows, expected 1..{per_rank}")
        self.lengths = np.asarray(lengths)
        self.rank, self.world = rank, world
        self.batch_size = batch_size
        self.shuffle, self.group_by_length = shuffle, group_by_length
        self.seed, self.mega_factor = seed, mega_factor
        self.full_per_rank = self.per_rank = per_rank
        self.epoch = 0
        self.skip = 0
        self.keep: np.ndarray | None = None  # the rows of a partial epoch (see set_epoch)

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0, keep: Sequence[int] | None = None,
                  per_rank: int | None = None) -> None:
        """Select the epoch; `skip_batches` resumes mid-epoch at that batch.

        `keep` (with `per_rank`, the largest count of kept rows over the ranks) restricts
        the epoch to these local rows: the rest of an epoch that other ranks began, after a
        resume on a different number of ranks. The kept rows are ordered, grouped and evened
        out to `per_rank` as a whole epoch's are; `len()` counts the partial epoch's batches.
        """
        self.epoch, self.skip = epoch, skip_batches
        if keep is None:
            self.keep, self.per_rank = None, self.full_per_rank
            return
        if per_rank is None or (len(keep) and per_rank < len(keep)):
            raise ValueError(f"per_rank must cover this rank's {len(keep)} kept rows")
        self.keep, self.per_rank = np.asarray(keep, dtype=np.int64), per_rank

    def batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        rows = self.keep if self.keep is not None else np.arange(len(self.lengths))
        if len(rows) == 0:  # nothing left here: repeat rows so that this rank keeps step
            rows = np.arange(len(self.lengths))
        order = rows[rng.permutation(len(rows))] if self.shuffle else rows
        # Even out: repeat the first few of this epoch's order (cyclically, if a rank
        # holds far fewer rows: long sentences split into windows make shards uneven).
        order = np.resize(order, self.per_rank)
        if self.group_by_length:
            mega = self.batch_size * self.mega_factor
            chunks = [order[i : i + mega] for i in range(0, len(order), mega)]
            order = np.concatenate(
                [c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks]
            )
        batches = [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        if self.group_by_length and self.shuffle and len(batches) > 1:
            # One batch order on every rank (seeded by epoch, not rank): step k takes the
            # k-th batch of each rank's length-sorted mega-batches, so the ranks' batches
            # at a step have similar lengths and none idles in the allreduce for another.
            shared = np.random.default_rng([self.seed, epoch])
            batches = [batches[i] for i in shared.permutation(len(batches))]
            # The longest batch first: an out-of-memory shows up in the first step.
            longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b]].max())
            batches[0], batches[longest] = batches[longest], batches[0]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)[self.skip :]
