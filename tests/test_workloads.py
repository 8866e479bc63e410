"""The RL-shaped length profile the demo and the benchmarks share."""

from __future__ import annotations

from efficientrollout.pipeline.workloads import long_tail_lengths


def test_long_tail_lengths_are_mostly_short_with_a_seeded_tail():
    lengths = long_tail_lengths(32, 512, seed=3)
    assert lengths == long_tail_lengths(32, 512, seed=3) != long_tail_lengths(32, 512, seed=4)
    assert lengths.count(512) >= 2 and all(8 <= n <= 512 for n in lengths)
    assert sorted(lengths)[16] < 100  # the median sample is short...
    assert sum(sorted(lengths)[-2:]) > 0.3 * sum(lengths)  # ...and two samples hold a large share of the tokens
    assert long_tail_lengths(1, 64, seed=0) == [64]  # a single sample is the tail
