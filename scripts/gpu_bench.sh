#!/usr/bin/env bash
# The native engine on a CUDA GPU, in one go (~5 min on an H100): the GPU-relevant tests, the
# drafter's candidate kernels per layer shape, step costs and a long-tail wave with and without
# CUDA graphs, on a random model with Llama-3-8B layer shapes (8 layers; costs are real,
# acceptance is not) and, if it loads, the bundled SmolLM2. Needs the project installed with a
# CUDA build of torch; writes logs and JSON under $OUT (default out/gpu).
#   scripts/gpu_bench.sh            PYTHON=python3 OUT=/tmp/gpu scripts/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-out/gpu}
MODEL=${MODEL:-$OUT/llama8b-8layers}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
last() { tail -1 "$1" | cut -c1-"${2:-2000}"; }

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
echo "== tests on CUDA"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_speculation.py tests/test_drafter.py \
  tests/test_engine.py tests/test_sampler.py > "$OUT/pytest.log" 2>&1; tail -3 "$OUT/pytest.log"
echo "== sampling draws (the race's Triton kernel against PyTorch ops)"
timeout 90 "$PY" scripts/bench_sampling.py --device cuda --rows 1,8,64,256 > "$OUT/sampling.log" 2>&1; last "$OUT/sampling.log" 1500
echo "== drafter kernels per linear"
timeout 120 "$PY" scripts/bench_linear.py > "$OUT/linear.log" 2>&1; grep '^{"shape' "$OUT/linear.log" | cut -c1-400
[ -f "$MODEL/config.json" ] || timeout 120 "$PY" scripts/make_random_checkpoint.py "$MODEL" --layers 8
for graphs in "" "--cuda-graphs"; do
  tag=${graphs:+graphs}; tag=${tag:-eager}
  echo "== bench_step, $tag"
  timeout 180 "$PY" scripts/bench_step.py --model "$MODEL" --dtype bfloat16 --batches 1,4,16,64 --contexts 512,2048 \
    --drafters torchao,fp8,int4 $graphs > "$OUT/step_$tag.log" 2>&1; last "$OUT/step_$tag.log" 600
  echo "== bench_rollout, $tag"
  timeout 300 "$PY" scripts/bench_rollout.py --model "$MODEL" --dtype bfloat16 --drafter int4 --repeats 1 \
    --sweep-batches 1,16 --sweep-repeats 2 --sweep-candidates 2 --sweep-k 6 --png "$OUT/rollout_$tag.png" $graphs \
    > "$OUT/rollout_$tag.log" 2>&1; last "$OUT/rollout_$tag.log" 800
done
echo "== the GRPO example's rollouts (bundled SmolLM2, fp32), eager"
timeout 300 "$PY" scripts/bench_grpo_rollout.py --device cuda --seed 1 > "$OUT/grpo_rollout.log" 2>&1; last "$OUT/grpo_rollout.log" 600
