"""Versioned policy weights: storage, the HTTP policy server, publisher and fetcher."""

from .cache import WeightCache, default_cache_root
from .client import FetchStopped, PolicyClient, PolicyPublisher
from .store import PolicyConflict, PolicyError, PolicyStore, PolicyUnavailable, WeightManifest

__all__ = ["FetchStopped", "PolicyClient", "PolicyConflict", "PolicyError", "PolicyPublisher", "PolicyStore", "PolicyUnavailable", "WeightCache",
           "WeightManifest", "default_cache_root"]
