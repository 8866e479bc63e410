"""EfficientRollout: fast RL rollouts with the current policy, quantized, as its own drafter."""

from .cpu import cap_torch
from .startup import quiet_known_noise

cap_torch()
quiet_known_noise()
