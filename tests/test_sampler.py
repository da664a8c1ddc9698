"""The distributed batch sampler: equal batch counts, coverage, determinism."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from hvdft.data.sampler import DistributedBatchSampler, padded_shard_size, shard_size


def samplers(total: int, world: int, batch: int, **kw) -> list[DistributedBatchSampler]:
    rng = np.random.default_rng(total)
    lengths = rng.integers(3, 60, size=total)
    per_rank = padded_shard_size(total, world)
    return [
        DistributedBatchSampler(lengths[r::world], per_rank, r, world, batch, **kw) for r in range(world)
    ]


# fewer examples than ranks is a user error (tested in test_failures.py), not a sampler case
@pytest.mark.parametrize(("world", "total"), [(w, t) for w in range(1, 9) for t in (8, 13, 101, 257) if t >= w])
@pytest.mark.parametrize("grouped", [True, False])
def test_equal_batches_and_full_coverage(world: int, total: int, grouped: bool) -> None:
    ss = samplers(total, world, batch=4, group_by_length=grouped)
    for epoch in range(3):
        per_rank = [s.batches(epoch) for s in ss]
        assert len({len(b) for b in per_rank}) == 1, "every rank runs the same number of steps"
        assert all(len(b) == len(ss[0]) for b in per_rank)
        used = Counter()
        for r, batches in enumerate(per_rank):
            local = [i for b in batches for i in b]
            assert len(local) == padded_shard_size(total, world)
            used.update(r + world * i for i in local)  # back to global example ids
        assert set(used) == set(range(total)), "every example is used each epoch"
        repeats = sum(used.values()) - total
        assert repeats == padded_shard_size(total, world) * world - total < world


def test_deterministic_per_seed_and_epoch_and_different_across_epochs() -> None:
    a, b = samplers(200, 2, 8, seed=7), samplers(200, 2, 8, seed=7)
    assert a[0].batches(0) == b[0].batches(0) and a[1].batches(3) == b[1].batches(3)
    assert a[0].batches(0) != a[0].batches(1)
    assert samplers(200, 2, 8, seed=8)[0].batches(0) != a[0].batches(0)


def test_length_grouping_reduces_padding() -> None:
    def padding(s: DistributedBatchSampler) -> float:
        total = sum(len(b) * s.lengths[b].max() for b in s.batches(0))
        return 1 - s.lengths.sum() / total

    grouped = samplers(2000, 1, 32, group_by_length=True)[0]
    plain = samplers(2000, 1, 32, group_by_length=False)[0]
    assert padding(grouped) < padding(plain) / 3


def test_longest_batch_first() -> None:
    s = samplers(500, 2, 16)[0]
    batches = s.batches(0)
    assert s.lengths[batches[0]].max() == s.lengths.max()


def test_in_order_mode_matches_one_big_batch() -> None:
    # 2 ranks x 3 == 1 rank x 6 over the same global examples, step by step.
    total = 24
    two = samplers(total, 2, 3, shuffle=False, group_by_length=False)
    one = samplers(total, 1, 6, shuffle=False, group_by_length=False)[0]
    for k, big in enumerate(one.batches(0)):
        union = sorted(r + 2 * i for r in range(2) for i in two[r].batches(0)[k])
        assert union == sorted(big)


def test_resume_skips_batches() -> None:
    s = samplers(100, 2, 4)[0]
    s.set_epoch(2, skip_batches=5)
    assert list(s) == s.batches(2)[5:]


def test_uneven_rows_from_windows_are_evened_cyclically() -> None:
    # rank 1 holds 1 row, rank 0 holds 7 (long sentences split into windows)
    per_rank = 7
    s = DistributedBatchSampler([5], per_rank, 1, 2, 3)
    batches = s.batches(0)
    assert len(batches) == 3 and sum(len(b) for b in batches) == per_rank


def test_shard_size() -> None:
    assert [shard_size(10, r, 3) for r in range(3)] == [4, 3, 3]


def test_ranks_take_batches_of_similar_length_at_each_step() -> None:
    # Step k pairs the k-th length-sorted batch of every rank: a rank with a short batch
    # would otherwise wait in the allreduce for a rank with a long one.
    ss = samplers(4000, 2, 16)
    a, b = (s.batches(1) for s in ss)
    longest = [(ss[0].lengths[x].max(), ss[1].lengths[y].max()) for x, y in zip(a, b, strict=True)]
    gap = np.mean([abs(p - q) / max(p, q) for p, q in longest])
    assert gap < 0.1, gap
