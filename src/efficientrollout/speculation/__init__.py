"""Engine-agnostic speculation: the quantized self-drafter, lossless verification, the gate."""

from .drafter import Drafter
from .gate import MODES, SpeculationConfig, SpeculationGate, expected_tokens
from .verify import verify

__all__ = ["MODES", "Drafter", "SpeculationConfig", "SpeculationGate", "expected_tokens", "verify"]
