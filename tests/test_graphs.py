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


@pytest.mark.parametrize("mode", ["plain", "always"])
def test_padded_graph_steps_generate_what_the_eager_engine_does(tiny_dir, mode):
    cuda = torch.cuda.is_available()
    # On CPUs an fp32 target drafts with FBGEMM, which quantizes each call's activations per
    # tensor, so padding rows changes the real rows' drafts; CUDA's int8 drafter is weight-only,
    # row by row. The exact drafter (CPUs) makes a sampled rejection a draw from rounding noise
    # (target minus an equal draft), so there speculative rows are greedy; plain covers sampling.
    sampled = mode == "plain" or cuda
    config = EngineConfig(model=str(tiny_dir), dtype="float32", max_batch_size=8, max_seq_len=352,
                          speculation=SpeculationConfig(mode=mode, k=3, probe=False, drafter="int8" if cuda else "exact"))
    eager, padded = NativeEngine(config), NativeEngine(config)
    graphs = padded.runner.graphs = StepGraphs(padded.runner, capture=cuda)
    want, got = eager.generate(_requests(sampled)), padded.generate(_requests(sampled))
    for w, g in zip(want, got):
        assert w.error is None and g.error is None
        assert g.output_token_ids == w.output_token_ids
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
    shapes = {key[1:] for key in graphs.graphs}  # (rows, width, keys)
    assert {b for b, _, _ in shapes} >= {8, 4, 2, 1}  # every batch size the wave shrank through
    assert {s for _, _, s in shapes} == {256, 352}  # keys: 256, then the cache's length
    if mode == "always":
        assert {t for _, t, _ in shapes} >= {1, 4}  # draft steps and K=3 verifies (shorter at the ends)
        assert any(g.speculation.accepted for g in got)
        drafts = {key: g for key, g in graphs.graphs.items() if key[0] == id(padded.drafter.decoder)}
        assert drafts
        padded.drafter.requantize()  # new int8 tensors: a graph holding the old ones must not replay
        padded.generate(_requests()[:1])
        assert all(graphs.graphs[key] is not g for key, g in drafts.items() if key in graphs.graphs and key[1] == 1)


def test_cuda_graphs_need_a_gpu(tiny_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="CUDA"):
        NativeEngine(EngineConfig(model=str(tiny_dir), device="cpu", cuda_graphs=True, speculation=SpeculationConfig(mode="plain")))
