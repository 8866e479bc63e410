"""Engines: the protocol every backend implements, and the backends (native/)."""

from .base import Engine, EngineUnusable

__all__ = ["Engine", "EngineUnusable"]
