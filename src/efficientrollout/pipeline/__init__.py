"""Producers, the engine worker loop and (later) the fleet supervisor and CLI."""

from .client import Rollout, RolloutClient
from .worker import WaveStats, WaveWorker

__all__ = ["Rollout", "RolloutClient", "WaveStats", "WaveWorker"]
