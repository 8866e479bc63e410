"""What the CPU offers our code paths, and a switch to run as on an AVX2-only CPU.

`EFFICIENTROLLOUT_CPU_ISA=avx2` makes a process on an AVX-512 machine take the paths an
AVX2 + FMA machine takes (no AVX-512, no native bf16, no VNNI, no AMX): our checks below say so,
our C++ kernels are compiled for Haswell instead of this CPU, and PyTorch's own libraries are
capped the same way (ATen, oneDNN, MKL, FBGEMM: their variables are set here when the package is
imported, before any of them runs, unless already set). For testing and measuring those paths
where no such machine is at hand; the hardware's speed stays this machine's.
"""

from __future__ import annotations

import os

ISA_ENV = "EFFICIENTROLLOUT_CPU_ISA"
_TORCH_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
               "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}


def isa_cap() -> str | None:
    """"avx2" where the process is held to AVX2 (EFFICIENTROLLOUT_CPU_ISA), else None."""
    value = os.environ.get(ISA_ENV, "").strip().lower()
    if value in ("", "native"):
        return None
    if value != "avx2":
        raise ValueError(f"{ISA_ENV}={value!r}: expected avx2 or native")
    return value


def cap_torch() -> None:
    """Hold PyTorch's libraries to AVX2 too, where the cap is asked for (each reads its variable
    once, at its first use: this module imports torch only inside its functions)."""
    if isa_cap():
        for name, value in _TORCH_CAPS.items():
            os.environ.setdefault(name, value)


def avx512() -> bool:
    import torch

    return isa_cap() is None and torch.cpu._is_avx512_supported()


def native_bf16() -> bool:
    """bf16 matmuls in hardware (AVX512-BF16 or AMX); without, CPU bf16 falls back to scalar code."""
    import torch

    return isa_cap() is None and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def vnni() -> bool:
    import torch

    return isa_cap() is None and torch.cpu._is_vnni_supported()


def label() -> str:
    """This CPU's kind as the benchmarks record it: avx512_bf16, avx2, or "avx2 (capped)"."""
    if isa_cap():
        return "avx2 (capped)"
    import torch

    return "avx512_bf16" if native_bf16() else "avx2" if torch.cpu._is_avx2_supported() else os.uname().machine


def march() -> str:
    """The -march our C++ kernels are compiled with."""
    return "haswell" if isa_cap() else "native"
