"""Versioned policy weights: storage now; the HTTP server and publisher build on it."""

from .store import PolicyError, PolicyStore, WeightManifest

__all__ = ["PolicyError", "PolicyStore", "WeightManifest"]
