"""Our C++ CPU kernels, compiled on first use for the machine they run on.

Only what ATen does badly at decode shapes lives here (see the .cpp files). The build takes
~15 s once per machine (cached under ~/.cache/efficientrollout, keyed by the source, torch
version and CPU; for Haswell under EFFICIENTROLLOUT_CPU_ISA=avx2, see efficientrollout.cpu);
without a C++ compiler, or with EFFICIENTROLLOUT_CPU_KERNELS=0, callers use
the plain PyTorch ops instead, which give the same results up to rounding.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path

import torch

from .. import cpu

log = logging.getLogger(__name__)
SOURCES = [Path(__file__).with_name(name) for name in ("kernels.h", "decode_cpu.cpp", "attention_cpu.cpp", "attention_f32_cpu.cpp", "gemv_cpu.cpp", "gemv_f32_cpu.cpp", "panels_f32_cpu.cpp", "int8_vnni_cpu.cpp", "layer_cpu.cpp", "quantize_cpu.cpp", "sampling_cpu.cpp")]


def _cpu_tag() -> str:
    flags = ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return hashlib.sha256(flags.encode()).hexdigest()[:8] + ("_" + cpu.march() if cpu.isa_cap() else "")


@functools.cache
def cpu_ops():
    """torch.ops.efficientrollout with the CPU kernels loaded, or None where they cannot be."""
    if os.environ.get("EFFICIENTROLLOUT_CPU_KERNELS", "1") == "0":
        return None
    from torch.utils import cpp_extension

    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + torch.__version__.encode()).hexdigest()[:12]
    name = f"efficientrollout_cpu_{digest}_{_cpu_tag()}"
    build = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "efficientrollout" / "kernels" / name
    build.mkdir(parents=True, exist_ok=True)
    built = build / f"{name}.so"  # the name pins sources, torch and CPU: a build that exists is this one
    if built.exists():
        try:
            torch.ops.load_library(str(built))
            return torch.ops.efficientrollout
        except OSError:  # cut short while linking: build again
            built.unlink(missing_ok=True)
    lock = build / "lock"  # torch's build lock; one left by a process killed mid-build blocks every later start
    if lock.exists() and time.time() - lock.stat().st_mtime > 600:
        log.warning("removing a stale kernel build lock (%s)", lock)
        lock.unlink(missing_ok=True)
    log.info("compiling the CPU decode kernels for this machine (once, ~15 s)")
    try:
        cpp_extension.load(name=name, sources=[str(p) for p in SOURCES if p.suffix == ".cpp"], build_directory=str(build), is_python_module=False,
                           extra_cflags=["-O3", f"-march={cpu.march()}", "-fopenmp"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - no compiler / ninja: the PyTorch ops still work
        log.warning("CPU decode kernels unavailable (%s: %s); using PyTorch's ops", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None
    return torch.ops.efficientrollout


def gemv_ops(weight: torch.Tensor):
    """Our kernels where their 1-12-row linears can serve `weight` (bf16 on an AVX512-BF16 CPU,
    rows a multiple of 32 wide), else None."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.shape[-1] % 32:
        return None
    kernels = cpu_ops()
    return kernels if kernels is not None and kernels.bf16_gemv_available() else None


def int8_gemv_op(weight: torch.Tensor):
    """Our kernel for 1-12 rows of an int8 copy of `weight` (int8 rows, an fp32 scale each), in
    and out in `weight`'s dtype, or None. bf16: `int8_linear_bf16` (AVX512-BF16 CPUs, rows a
    multiple of 32 wide), which runs `int8_vnni_gemv` over fp32 copies of the activations on
    AVX512-VNNI CPUs, elsewhere `int8_gemv` (layer_cpu.cpp). fp32: `int8_linear_f32` (AVX2+FMA
    CPUs, rows a multiple of 8 wide), which runs `int8_vnni_gemv` on AVX512-VNNI CPUs
    (activations quantized per block of 64), elsewhere
    `int8_f32_gemv` over the fp32 activations, or on AVX512-BF16 CPUs from 7 rows the bf16
    kernel over bf16 copies of them, whichever is faster there (layer_cpu.cpp)."""
    if weight.device.type != "cpu" or (kernels := cpu_ops()) is None:
        return None
    if weight.dtype == torch.bfloat16:
        return kernels.int8_linear_bf16 if kernels.bf16_gemv_available() and weight.shape[-1] % 32 == 0 else None
    return None if (kernels := _f32_ops(weight)) is None else kernels.int8_linear_f32


def _f32_ops(weight: torch.Tensor):
    """Our kernels where their fp32 1-12-row linears serve `weight` (fp32 on a CPU, rows a
    multiple of 8 wide, AVX2 and FMA), else None."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.shape[-1] % 8:
        return None
    kernels = cpu_ops()
    return kernels if kernels is not None and kernels.f32_gemv_available() else None


def panel_ops(weight: torch.Tensor):
    """Our kernels where fp32 panels (panels_f32_cpu.cpp) serve `weight`: fp32 on an AVX-512 CPU,
    a multiple of 16 rows (outputs); else None."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2 or weight.shape[0] % 16:
        return None
    kernels = cpu_ops()
    return kernels if kernels is not None and kernels.f32_panels_available() else None


def streamed_linear_op(weight: torch.Tensor):
    """Our kernel for 1-12-row linears over `weight`, where one serves it: `bf16_gemv` for bf16
    weights (gemv_ops), `f32_gemv` for fp32 weights rows a multiple of 8 wide on AVX2+FMA CPUs;
    else None."""
    if (kernels := gemv_ops(weight)) is not None:
        return kernels.bf16_gemv
    return None if (kernels := _f32_ops(weight)) is None else kernels.f32_gemv
