"""Keep start-up output to what a user needs.

Importing torchao logs a warning for each optional CUDA extension it cannot load (the CPU wheel
ships `_C_mxfp8` / `_C_cutlass_90a` builds for another Python and GPU), torch's pytree logs a
deprecation notice for each Enum torchao registers, and on CPUs without AVX512 the FBGEMM int8
drafter's per-channel quantized weights raise a deprecation UserWarning (a note for us, the
maintainers: that API is slated for removal). None is actionable for a user, and users read
them as breakage. Only those exact messages are dropped; anything else still shows.
"""

from __future__ import annotations

import logging
import warnings

_KNOWN_NOISE = {  # logger → message fragments (a logger's filters see only its own records)
    "torchao": ("Failed to load ", "Skipping import of cpp extensions"),
    "torchao.kernel.intmm": ("Detected no triton",),  # CPU machines have no Triton; nothing here needs it
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
}


class _DropKnownNoise(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(f in message for f in self.fragments)


def quiet_known_noise() -> None:
    """Install the filters (idempotent); must run before torchao is first imported."""
    warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized",
                            category=UserWarning)
    for name, fragments in _KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
            logger.addFilter(_DropKnownNoise(fragments))
