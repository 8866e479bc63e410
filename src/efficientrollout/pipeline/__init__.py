"""Producers, the engine worker loop and (later) the fleet supervisor and CLI."""

from .worker import WaveStats, WaveWorker

__all__ = ["WaveStats", "WaveWorker"]
