"""The AVX2-only paths, exercised on whatever CPU runs the suite (`EFFICIENTROLLOUT_CPU_ISA=avx2`,
see efficientrollout.cpu): sessions land on AVX-512 machines for weeks, and the fp32 engine
of an AVX2 machine takes other kernels (no panels, no VNNI, FBGEMM or our 8-lane int8 GEMV,
oneDNN's AVX2 GEMMs) that would otherwise first run on one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from efficientrollout import cpu

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, torch
from efficientrollout import cpu
from efficientrollout.engines.native.engine import resolve_dtype
from efficientrollout.kernels import cpu_ops
from efficientrollout.speculation.drafter import pick_kernel, w8a8_cpu_weight_qmax
k = cpu_ops()
print(json.dumps({"label": cpu.label(), "avx512": cpu.avx512(), "bf16": cpu.native_bf16(), "vnni": cpu.vnni(),
    "auto": str(resolve_dtype("auto", torch.device("cpu"))), "aten": torch.backends.cpu.get_cpu_capability(),
    "kernels": None if k is None else [k.f32_panels_available(), k.bf16_gemv_available(), k.f32_gemv_available()],
    "int8": pick_kernel(torch.device("cpu"), 8, torch.float32), "w8a8_qmax": w8a8_cpu_weight_qmax(),
    "int_mm_7bit_exact": torch._int_mm(a := torch.randint(-128, 128, (5, 256), dtype=torch.int8),
                                       b := torch.randint(-63, 64, (256, 16), dtype=torch.int8)).equal(a.int() @ b.int())}))
"""
# ISA-dependent files; the three slowest statistical tests (~60 s, the same sampler on every CPU) stay out
AVX2_TESTS = ["test_kernels.py", "test_drafter.py", "test_models.py", "test_engine.py", "test_sampler.py", "test_graphs.py",
              "test_speculation.py", "test_smollm2.py"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in cpu.TORCH_CAPS}
    return env | extra


@pytest.mark.skipif(not torch.cpu._is_avx2_supported(), reason="the cap runs as an AVX2 CPU: this one has no AVX2")
def test_the_avx2_cap_holds_our_checks_our_kernels_and_pytorch_to_avx2():
    out = subprocess.run([sys.executable, "-c", PROBE], env=_env(EFFICIENTROLLOUT_CPU_ISA="avx2"), capture_output=True,
                         text=True, timeout=300, check=True).stdout
    seen = json.loads(out.splitlines()[-1])
    assert seen["label"] == "avx2 (capped)" and not (seen["avx512"] or seen["bf16"] or seen["vnni"])
    assert seen["auto"] == "torch.float32" and seen["aten"] == "AVX2"  # as on an AVX2-only machine
    if seen["kernels"] is not None:  # compiled for Haswell: no AVX-512 kernel inside
        assert seen["kernels"] == [False, False, True]
    assert seen["int8"] in ("int8pack", "fbgemm")
    # oneDNN held to AVX2 (no VNNI): full-range int8 weights saturate, 7-bit ones are exact
    assert seen["w8a8_qmax"] == 63.0 and seen["int_mm_7bit_exact"]


def test_an_unknown_cap_is_refused():
    with pytest.raises(ValueError, match="avx2 or native"):
        cpu.parse_cap("avx10")
    assert cpu.parse_cap(" Native") is None and cpu.parse_cap("") is None and cpu.parse_cap("AVX2") == "avx2"
    run = subprocess.run([sys.executable, "-c", "import efficientrollout.cpu as c; c.isa_cap()"], env=_env(EFFICIENTROLLOUT_CPU_ISA="avx10"),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "expected avx2 or native" in run.stderr


@pytest.mark.skipif(not cpu.avx512(), reason="the suite itself runs the AVX2 paths here")
def test_the_isa_dependent_tests_pass_on_the_avx2_paths():
    """~70 s: the kernel, drafter, model, engine, sampler, CUDA-graph, speculation and SmolLM2
    tests again, held to AVX2."""
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
            "-k", "not poor_drafter and not vocabulary_subset", *(str(ROOT / "tests" / f) for f in AVX2_TESTS)]
    run = subprocess.run(args, cwd=ROOT, env=_env(EFFICIENTROLLOUT_CPU_ISA="avx2"), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1]
