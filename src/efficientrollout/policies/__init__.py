"""Versioned policy weights: storage, the HTTP policy server, publisher and fetcher."""

from .client import PolicyClient, PolicyPublisher
from .store import PolicyError, PolicyStore, WeightManifest

__all__ = ["PolicyClient", "PolicyError", "PolicyPublisher", "PolicyStore", "WeightManifest"]
