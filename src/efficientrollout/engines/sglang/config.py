"""What only the SGLang backend needs; model, device, dtype and sizes come from EngineConfig."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ...options import option


@dataclass(slots=True)
class SGLangConfig:
    """What only the SGLang backend needs (model, device, dtype and sizes come from EngineConfig)."""

    sglang_python: str = option(sys.executable, "the Python that has sglang installed (SGLang pins its own torch; it "
                                "may live in another environment)", env="EFFICIENTROLLOUT_SGLANG_PYTHON")
    sglang_speculation: str = option("none", "none; efficientrollout (our self-drafter inside SGLang, gated per batch by the "
                                     "engine's --speculation mode, --k and --k-max; needs this package installed in SGLang's "
                                     "Python); or standalone (SGLang's own, the same checkpoint as draft with its own KV pool: "
                                     "the baseline)", choices=("none", "efficientrollout", "standalone"))
    sglang_draft_tokens: int = option(4, "standalone: draft tokens per verify (num-steps is one less)")
    sglang_max_total_tokens: int = option(32768, "SGLang's KV pool in tokens (its default sizes the pool to the "
                                          "device's memory: ~15 GB on a CPU)")
    sglang_args: str = option("", "more `sglang.launch_server` flags as one string, given with = "
                              "(--sglang-args=\"--attention-backend intel_amx\")")
    sglang_startup_timeout_s: float = option(600.0, "how long a server start may take")
    sglang_request_timeout_s: float = option(1800.0, "how long one sample may take")

    def __post_init__(self) -> None:
        if self.sglang_draft_tokens < 2:
            raise ValueError("sglang_draft_tokens must be >= 2")
