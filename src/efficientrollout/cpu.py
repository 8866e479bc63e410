"""What the CPU offers our code paths, and a switch to run as on an AVX2-only CPU.

`EFFICIENTROLLOUT_CPU_ISA=avx2`, set before the process starts, makes a process on an AVX-512
machine take the paths an AVX2 + FMA machine takes (no AVX-512, no native bf16, no VNNI, no
AMX): our checks below say so, our C++ kernels are compiled for Haswell instead of this CPU, and
PyTorch's own libraries are capped the same way (ATen, oneDNN, MKL, FBGEMM: `cap_torch` sets
their variables when the package is imported, before any of them runs; each reads its variable
once). For testing and measuring those paths where no such machine is at hand; the hardware's
speed stays this machine's.
"""

from __future__ import annotations

import functools
import os

ISA_ENV = "EFFICIENTROLLOUT_CPU_ISA"
TORCH_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
              "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}


def parse_cap(value: str) -> str | None:
    """"avx2" or None (native) from the variable's value; anything else is refused."""
    value = value.strip().lower()
    if value in ("", "native"):
        return None
    if value != "avx2":
        raise ValueError(f"{ISA_ENV}={value!r}: expected avx2 or native")
    return value


@functools.cache
def isa_cap() -> str | None:
    """"avx2" where the process is held to AVX2, else None (read once: what depends on it,
    compiled kernels and PyTorch's libraries, is fixed at first use too)."""
    cap = parse_cap(os.environ.get(ISA_ENV, ""))
    if cap:
        import torch

        if not torch.cpu._is_avx2_supported():
            raise ValueError(f"{ISA_ENV}=avx2 needs a CPU with AVX2 and FMA")
    return cap


def cap_torch() -> None:
    """Hold PyTorch's libraries to AVX2 too, where the cap is asked for (overriding their own
    variables: a process that says avx2 runs avx2 throughout)."""
    if parse_cap(os.environ.get(ISA_ENV, "")):
        os.environ.update(TORCH_CAPS)


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
    """This CPU's kind as the benchmarks record it: avx512_bf16, avx512, avx2, "avx2 (capped)",
    or the machine's architecture (e.g. aarch64)."""
    if isa_cap():
        return "avx2 (capped)"
    import torch

    if native_bf16():
        return "avx512_bf16"
    return "avx512" if avx512() else "avx2" if torch.cpu._is_avx2_supported() else os.uname().machine


def march() -> str:
    """The -march our C++ kernels are compiled with."""
    return "haswell" if isa_cap() else "native"
