"""The gate's math against slow references, and its decisions on synthetic step costs."""

from __future__ import annotations

import numpy as np

from efficientrollout.speculation import (
    SpeculationConfig,
    SpeculationGate,
    expected_tokens,
)


def test_expected_tokens_matches_a_simulation():
    rng = np.random.default_rng(0)
    for alpha, k in ((0.0, 3), (0.5, 1), (0.8, 4), (0.95, 8)):
        accepted = rng.random((200_000, k)) < alpha
        emitted = np.cumprod(accepted, axis=1).sum(axis=1) + 1
        assert abs(emitted.mean() - expected_tokens(alpha, k)) < 0.02
    assert expected_tokens(1.0, 5) == 6.0


def _gate(**cfg) -> SpeculationGate:
    """Synthetic engine: memory-bound below batch 16 (step ~ flat), compute-bound above."""
    gate = SpeculationGate(SpeculationConfig(explore_every=0, **cfg))
    for b in (1, 2, 4, 8, 16, 32, 64):
        plain = 0.02 + 0.002 * b
        gate.observe_target(b, plain)
        gate.observe_draft(b, 0.25 * plain)
        for k in (1, 4, 8):
            gate.observe_verify(b, k, 0.02 + 0.002 * b * (k + 1))
    gate.alpha = 0.85
    return gate


def test_adaptive_speculates_in_the_tail_and_turns_off_when_the_batch_grows():
    gate = _gate()
    ks = [gate.choose(b, wave_filled=True, k_cap=8) for b in (64, 32, 2, 1, 1, 64)]
    assert ks[0] == 0 and ks[1] == 0  # compute-bound: plain
    assert ks[2] > 0 and ks[3] > 0  # memory-bound tail: speculate
    assert ks[-1] == 0  # and back off when the batch grows again
    # the choice minimises the predicted cost (up to hysteresis)
    costs = {k: gate.predicted_cost(1, k) for k in range(9)}
    assert costs[ks[3]] <= min(costs.values()) * 1.05


def test_interpolated_verify_cost_is_between_its_neighbours():
    gate = _gate()
    lo, mid, hi = (gate.verify.predict(4, k) for k in (1, 2, 4))
    assert lo < mid < hi


def test_toggle_ladder_is_one_way_within_a_wave_and_moves_between_waves():
    gate = _gate(mode="toggle-ladder")
    gate.start_wave()
    assert gate.choose(64, wave_filled=True, k_cap=16) == 0
    assert gate.choose(1, wave_filled=False, k_cap=16) == 0  # waits for the batch to fill
    assert gate.choose(1, wave_filled=True, k_cap=16) == 5
    assert gate.choose(64, wave_filled=True, k_cap=16) == 5  # stays on for the rest of the wave
    gate.observe_acceptance(rows=10, k=5, accepted=50, rejected_rows=0)
    gate.end_wave()
    gate.start_wave()
    assert gate.config.ladder[gate.ladder_index] == 7
    gate.observe_acceptance(rows=10, k=7, accepted=10, rejected_rows=10)
    gate.end_wave()
    assert gate.config.ladder[gate.ladder_index] == 5


def test_exploration_re_measures_plain_while_speculating():
    """A gate that speculates for a long stretch still takes plain steps now and then, so a
    plain cost that went stale (here: 3x too high) is corrected and speculation stops."""
    gate = SpeculationGate(SpeculationConfig(explore_every=4))
    gate.observe_target(2, 0.030)  # stale: plain is really 0.010 s here
    gate.observe_draft(2, 0.006)
    for k in (1, 2, 3, 4):
        gate.observe_verify(2, k, 0.012 + 0.002 * k)
    gate.alpha = 0.6
    ks = []
    for _ in range(80):
        k = gate.choose(2, wave_filled=True, k_cap=8)
        ks.append(k)
        if k == 0:
            gate.observe_target(2, 0.010)
    assert ks[0] > 0  # speculates on the stale estimate at first...
    assert ks[-8:] == [0] * 8  # ...and settles on plain once it re-measured it


def test_adaptive_measures_a_batch_size_it_never_drafted_at():
    """Costs known only at a large batch (no start-up probe, as inside SGLang) extrapolate badly to
    the tail; the gate must still try drafting there instead of trusting the extrapolation."""
    gate = SpeculationGate(SpeculationConfig(explore_every=16))
    gate.observe_target(32, 0.05)
    gate.observe_draft(32, 0.05)  # drafting at batch 32 costs a full step: hopeless there
    gate.observe_verify(32, 2, 0.15)
    gate.observe_target(2, 0.01)
    ks = [gate.choose(2, wave_filled=True, k_cap=8) for _ in range(32)]
    assert any(k > 0 for k in ks)
    gate.observe_draft(2, 0.001)  # once measured there, the prediction decides again
    gate.observe_verify(2, 2, 0.5)
    assert all(gate.choose(2, wave_filled=True, k_cap=8) == 0 for _ in range(64))


def test_adaptive_trusts_interpolation_between_the_probes_batch_sizes():
    """Between measured batch sizes at most 4x apart (the start-up probe's 1, 4, 16, 64) the gate
    interpolates instead of drafting once at every size: a draft at 48 rows, where speculation
    clearly loses, cost 4-5x a plain step in GRPO replays."""
    gate = SpeculationGate(SpeculationConfig(explore_every=4))
    for b, plain, draft in ((16, 0.05, 0.04), (64, 0.15, 0.14)):  # drafting costs nearly a full step
        gate.observe_target(b, plain)
        gate.observe_draft(b, draft)
        gate.observe_verify(b, 2, 4 * plain)
    assert gate.draft.measured(32) and gate.draft.measured(48) and not gate.draft.measured(8)
    assert all(gate.choose(48, wave_filled=True, k_cap=8) == 0 for _ in range(32))
    assert any(gate.choose(8, wave_filled=True, k_cap=8) > 0 for _ in range(32))  # below the probes: measured
