"""Redis Streams queue between trainers and engines."""

from .server import RedisServer
from .streams import Claimed, RolloutQueue

__all__ = ["Claimed", "RedisServer", "RolloutQueue"]
