"""The sampling math against slow obvious references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from efficientrollout.kernels import cpu_ops
from efficientrollout.kernels.sampling_triton import race_op
from efficientrollout.sampling import (
    RACE_GROUP,
    SamplingBatch,
    derive_seed,
    filtered_probs,
    inverse_cdf,
    inverse_cdf_torch,
    race,
    race_keys,
    race_torch,
    sample,
    sample_torch,
    scaled_logprobs,
    seeded_uniform,
)


CUDA_KERNEL = pytest.mark.skipif(not torch.cuda.is_available() or race_op() is None, reason="needs a GPU and Triton")


def race_on_cuda(probs, keys):
    """`race` on CUDA tensors (the Triton kernel), picks back on the CPU."""
    return race(probs.cuda(), keys.cuda()).cpu()


RACES = [pytest.param(race, id="this-device"), pytest.param(race_torch, id="pytorch"),
         pytest.param(race_on_cuda, id="cuda", marks=CUDA_KERNEL)]


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


@pytest.mark.parametrize("race", RACES)
def test_race_follows_the_distribution_and_is_a_function_of_its_keys(race):
    """600 tokens: three groups of the first round, the last one padded; zeros never drawn."""
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(600) * 1.5, -1)
    probs[::7] = 0.0
    probs /= probs.sum()
    n = 60000
    keys = race_keys([11] * n, list(range(n)))
    tokens = race(probs.expand(n, -1), keys)
    counts = torch.bincount(tokens, minlength=600).double()
    assert counts[probs == 0].sum() == 0
    live = probs > 0
    dof = int(live.sum()) - 1

    def chi2_per_dof(p):
        expected = p.double() * n
        return float((((counts - expected) ** 2) / expected)[live].sum()) / dof

    assert chi2_per_dof(probs) < 1.25  # ~4 standard deviations at ~510 degrees of freedom
    sharper = probs**1.2 / (probs**1.2).sum()
    assert chi2_per_dof(sharper) > 1.5  # the statistic has power against a mild bias
    assert torch.equal(race(probs.expand(n, -1), keys), tokens)  # same keys, same tokens
    assert (race(probs.expand(n, -1), race_keys([12] * n, list(range(n)))) != tokens).any()


@pytest.mark.parametrize("race", RACES)
def test_race_picks_the_same_token_for_alike_distributions(race):
    """The coupling speculation relies on: equal distributions always pick alike, close ones
    about as often as sum(min(p, q)), far more often than independent draws would."""
    torch.manual_seed(1)
    V, n = 49152, 4000  # SmolLM2's vocabulary
    logits = torch.randn(V) * 4
    p = torch.softmax(logits, -1).expand(n, -1)
    q = torch.softmax(logits + 0.2 * torch.randn(V), -1).expand(n, -1)
    keys = race_keys(list(range(n)), [3] * n)
    picks = race(p, keys)
    assert torch.equal(race(p.clone(), keys), picks)
    match = (race(q, keys) == picks).double().mean().item()
    overlap = torch.minimum(p[0], q[0]).sum().item()
    independent = (race(q, race_keys(list(range(n, 2 * n)), [3] * n)) == picks).double().mean().item()
    assert overlap - 0.08 < match <= overlap + 0.02, (match, overlap)
    assert independent < 0.5 * match


@pytest.mark.parametrize("kernel", [
    pytest.param(lambda probs, keys: cpu_ops().race(probs, keys, RACE_GROUP), id="cpu",
                 marks=pytest.mark.skipif(cpu_ops() is None, reason="needs our CPU kernels (a C++ compiler)")),
    pytest.param(lambda probs, keys: race_op()(probs.cuda(), keys.cuda(), RACE_GROUP).cpu(), id="cuda", marks=CUDA_KERNEL)])
def test_race_kernel_picks_what_the_pytorch_race_picks(kernel):
    """The C++ race (CPU engines) and the Triton one (GPUs) against the PyTorch one: the same
    tokens, rows of several widths, zeros and all-in-one-group rows included."""
    torch.manual_seed(2)
    for V in (600, 49152):
        probs = torch.softmax(torch.randn(256, V) * torch.linspace(0.5, 8, 256)[:, None], -1)
        probs[:8, ::3] = 0.0
        probs[8:16] = 0.0
        probs[8:16, 5:9] = 0.25  # all the mass in one group
        probs /= probs.sum(-1, keepdim=True)
        keys = race_keys(list(range(256)), [V] * 256)
        got, want = kernel(probs, keys), race_torch(probs, keys)
        assert (got == want).float().mean() >= 0.995, V  # group masses are summed in another order
        assert torch.equal(got[8:16], want[8:16]) and (probs.gather(-1, got[:, None]) > 0).all()


@pytest.mark.skipif(cpu_ops() is None, reason="needs our CPU kernels (a C++ compiler)")
def test_inverse_cdf_kernel_picks_what_the_pytorch_draw_picks():
    """The C++ inverse-CDF draw (CPU engines) against PyTorch's cumsum and searchsorted: the
    same tokens, zero-probability tokens never, u at both ends of [0, 1)."""
    torch.manual_seed(3)
    for V in (300, 49152):
        probs = torch.softmax(torch.randn(512, V) * torch.linspace(0.5, 6, 512)[:, None], -1)
        probs[:, ::4] = 0.0
        probs /= probs.sum(-1, keepdim=True)
        u = torch.from_numpy(seeded_uniform([5] * 512, list(range(512))))
        u[:2] = torch.tensor([0.0, 1.0 - 2**-53], dtype=torch.float64)
        got = cpu_ops().inverse_cdf(probs, u)
        assert (got == inverse_cdf_torch(probs, u)).float().mean() >= 0.995, V  # sums in another order
        assert (probs.gather(-1, got[:, None]) > 0).all()


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
    tokens, lps = sample(logits, params, uniforms=torch.zeros(2, dtype=torch.float64))
    assert tokens.tolist() == [1, 2]
    assert torch.allclose(lps, torch.log_softmax(logits, -1)[[0, 1], [1, 2]])


@pytest.mark.skipif(cpu_ops() is None, reason="needs our CPU kernels (a C++ compiler)")
@pytest.mark.parametrize("coupling", ["uniforms", "keys"])
def test_the_fused_sampler_matches_the_pytorch_one(coupling):
    """sample() on CPUs without top-k / top-p (one C++ pass per row) against the PyTorch path:
    the same tokens and log-probs for greedy, cool, plain and hot rows, tokens at -inf never
    drawn; a NaN logit or a temperature whose logits / T overflow gives a non-finite log-prob."""
    torch.manual_seed(4)
    b, V = 256, 49152
    logits = torch.randn(b, V) * torch.linspace(0.5, 6, b)[:, None]
    logits[:, ::5] = float("-inf")
    temps = [(0.0, 0.7, 1.0, 1.6)[i % 4] for i in range(b)]
    params = SamplingBatch.build(temps, [1.0] * b, [0] * b, torch.device("cpu"))
    draw = {"uniforms": torch.from_numpy(seeded_uniform(list(range(b)), [9] * b))} if coupling == "uniforms" else {"keys": race_keys(list(range(b)), [9] * b)}
    tokens, lps = sample(logits, params, **draw)
    want_tokens, want_lps = sample_torch(logits, params, **draw)
    assert (tokens == want_tokens).float().mean() >= 0.995  # sums in another order flip a draw only at a boundary
    same = tokens == want_tokens
    assert torch.allclose(lps[same], want_lps[same], atol=2e-5)
    assert torch.equal(tokens[::4], logits[::4].argmax(-1)) and torch.isfinite(lps).all()
    assert (tokens % 5 != 0).all()  # -inf logits: probability 0
    bad = logits[:2].clone()
    bad[0, 7] = float("nan")
    tokens, lps = sample(bad, SamplingBatch.build([1.0, 1e-45], [1.0] * 2, [0] * 2, torch.device("cpu")), **{k: v[:2] for k, v in draw.items()})
    assert not torch.isfinite(lps).any() and ((tokens >= 0) & (tokens < V)).all()


def test_bench_sampling_times_each_draw_and_checks_the_race():
    """scripts/bench_sampling.py: a time for every draw at every row count, and this device's race
    picking the PyTorch race's tokens."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_sampling.py"
    out = subprocess.run([sys.executable, str(script), "--device", "cpu", "--rows", "1,5", "--vocab", "3000", "--repeats", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.splitlines()[-1])
    assert summary["bench"] == "sampling" and [r["rows"] for r in summary["rows"]] == [1, 5]
    for row in summary["rows"]:
        assert all(row[f"{name}_ms"] > 0 for name in ("race", "race_pytorch", "inverse_cdf", "sample_race", "sample_inverse_cdf", "sample_pytorch"))
        assert row["race_matches_pytorch"] == 1.0  # sums in another order flip a pick only at a near-tie
