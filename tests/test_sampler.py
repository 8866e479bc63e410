"""The sampling math against slow obvious references."""

from __future__ import annotations

import numpy as np
import torch

from efficientrollout.sampling import (
    SamplingBatch,
    derive_seed,
    filtered_probs,
    inverse_cdf,
    sample,
    scaled_logprobs,
    seeded_uniform,
)


def test_seeded_uniform_is_a_pure_function_in_range():
    u1 = seeded_uniform([1, 2, 3] * 1000, list(range(3000)))
    u2 = seeded_uniform([1, 2, 3] * 1000, list(range(3000)))
    assert np.array_equal(u1, u2) and u1.min() >= 0.0 and u1.max() < 1.0
    assert abs(u1.mean() - 0.5) < 0.02 and abs(u1.var() - 1 / 12) < 0.01
    assert not np.array_equal(u1, seeded_uniform([1, 2, 3] * 1000, list(range(3000)), stream=1))
    assert derive_seed(5, 0) != derive_seed(5, 1) and derive_seed(5, 1) == derive_seed(5, 1)


def test_inverse_cdf_follows_the_distribution():
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0]])
    n = 20000
    u = torch.from_numpy(seeded_uniform([9] * n, list(range(n))))
    tokens = inverse_cdf(probs.expand(n, -1), u)
    counts = torch.bincount(tokens, minlength=5).double()
    assert counts[1] == 0 and counts[4] == 0
    expected = probs[0].double() * n
    chi2 = float((((counts - expected) ** 2) / expected.clamp(min=1e-9))[probs[0] > 0].sum())
    assert chi2 < 13.8  # 2 degrees of freedom, p = 0.001


def test_filters_match_a_per_row_reference():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    temps, top_ps, top_ks = [1.0, 0.5, 1.0, 2.0, 1.0, 0.0], [1.0, 0.9, 0.5, 1.0, 0.3, 0.2], [0, 0, 10, 3, 2, 0]
    params = SamplingBatch.build(temps, top_ps, top_ks, torch.device("cpu"))
    got = filtered_probs(scaled_logprobs(logits, params.temperature), params)
    for row in range(6):
        t = temps[row] or 1.0
        p = torch.softmax(logits[row] / t, -1)
        keep = torch.zeros(50, dtype=torch.bool)
        if temps[row] == 0:
            keep[:] = True
        else:
            mass = 0.0
            for rank, idx in enumerate(p.argsort(descending=True).tolist()):
                if (top_ks[row] and rank >= top_ks[row]) or mass >= top_ps[row]:
                    break
                keep[idx] = True
                mass += float(p[idx])
        ref = torch.where(keep, p, 0.0)
        assert torch.allclose(got[row], ref / ref.sum(), atol=1e-6), row


def test_greedy_rows_take_the_argmax_and_report_unscaled_logprobs():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]])
    params = SamplingBatch.build([0.0, 0.0], [1.0, 1.0], [0, 0], torch.device("cpu"))
    tokens, lps = sample(logits, params, torch.zeros(2, dtype=torch.float64))
    assert tokens.tolist() == [1, 2]
    assert torch.allclose(lps, torch.log_softmax(logits, -1)[[0, 1], [1, 2]])
