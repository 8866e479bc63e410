"""Engine-agnostic speculation: the quantized self-drafter, lossless verification, the gate."""

from .drafter import Drafter
from .gate import MODES, SpeculationConfig, SpeculationGate, expected_tokens
from .trace import StepRecord
from .verify import verify

__all__ = ["MODES", "Drafter", "SpeculationConfig", "SpeculationGate", "StepRecord", "expected_tokens", "verify"]
