"""The native engine's CUDA-graph steps (runner.StepGraphs): rows padded to a power of two and
keys to a power of two from 256 must generate exactly what the eager engine does. On CPUs the
padded forward runs eagerly (capture=False), which checks the padding; on CUDA it is captured."""

from __future__ import annotations

import pytest
import torch

from efficientrollout.engines.native import EngineConfig, NativeEngine
from efficientrollout.engines.native.runner import StepGraphs
from efficientrollout.protocol import RolloutRequest, SamplingParams
from efficientrollout.speculation import SpeculationConfig


def _requests(sampled: bool = True) -> list[RolloutRequest]:
    # 5 rows (padded to 8) leaving one by one (4, 4, 2, 1), greedy and sampled, past 256 keys
    lengths, temps = (300, 40, 120, 260, 7), (0.0, 1.0, 0.0, 1.0, 1.0) if sampled else (0.0,) * 5
    return [RolloutRequest(id=str(i), prompt=f"Count with me, row {i}:",
                           sampling=SamplingParams(temperature=t, max_new_tokens=n, ignore_eos=True, seed=i))
            for i, (n, t) in enumerate(zip(lengths, temps))]


def _same(want, got) -> None:
    for w, g in zip(want, got):
        assert w.error is None and g.error is None
        assert g.output_token_ids == w.output_token_ids
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)


@pytest.mark.parametrize("mode", ["plain", "always"])
def test_padded_graph_steps_generate_what_the_eager_engine_does(tiny_dir, mode):
    cuda = torch.cuda.is_available()
    # On CPUs an fp32 target drafts with FBGEMM, which quantizes each call's activations per
    # tensor, so padding rows would change the real rows' drafts; CUDA's int8 drafter is
    # weight-only, row by row. The exact drafter (CPUs) makes a sampled rejection a draw from
    # rounding noise (target minus an equal draft), and cuBLAS may round 5 and 8 rows apart:
    # sampled rows only where neither applies (CPU, plain); greedy ones everywhere.
    sampled = mode == "plain" and not cuda
    config = EngineConfig(model=str(tiny_dir), dtype="float32", max_batch_size=8, max_seq_len=352,
                          speculation=SpeculationConfig(mode=mode, k=3, probe=False, drafter="int8" if cuda else "exact"))
    eager, padded = NativeEngine(config), NativeEngine(config)
    graphs = padded.runner.graphs = StepGraphs(padded.runner, capture=cuda, max_width=4)
    got = padded.generate(_requests(sampled))
    _same(eager.generate(_requests(sampled)), got)
    shapes = {key[1:] for key in graphs.graphs}  # (rows, width, keys)
    assert {b for b, _, _ in shapes} >= {8, 4, 2, 1}  # every batch size the wave shrank through
    assert {s for _, _, s in shapes} == {256, 352}  # keys: 256, then the cache's length
    if mode == "plain":
        return
    assert {t for _, t, _ in shapes} >= {1, 4}  # draft steps and K=3 verifies (shorter at the ends)
    assert any(g.speculation.accepted for g in got)
    # A weight update reaches the drafter's graphs: its new weights are copied into the
    # tensors they hold (no recapture), and both engines still generate the same tokens.
    held = dict(graphs.graphs)
    torch.manual_seed(1)
    state = {name: view.detach() * 0.8 + 0.05 * torch.randn_like(view) for name, view in padded.decoder.hf_parameter_views().items()}
    for engine in (eager, padded):
        engine.update_weights({k: v.clone() for k, v in state.items()}, version=1)
    got, want = padded.generate(_requests(False)), eager.generate(_requests(False))
    _same(want, got)
    # greedy tokens are the target's whatever the drafter; equal acceptance says the drafts were too
    assert [g.speculation.accepted for g in got] == [w.speculation.accepted for w in want]
    assert all(graphs.graphs[key] is g for key, g in held.items() if key in graphs.graphs)
    assert padded.drafter.decoder.graph_epoch == 0


def test_cuda_graphs_need_a_gpu(tiny_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="CUDA"):
        NativeEngine(EngineConfig(model=str(tiny_dir), device="cpu", cuda_graphs=True, speculation=SpeculationConfig(mode="plain")))
