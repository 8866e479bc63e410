"""EfficientRollout: fast RL rollouts with the current policy, quantized, as its own drafter."""

from .startup import quiet_known_noise

quiet_known_noise()
