"""Producers, the engine worker loop and (later) the fleet supervisor and CLI."""

from .client import RolloutClient
from .worker import WaveStats, WaveWorker

__all__ = ["RolloutClient", "WaveStats", "WaveWorker"]
