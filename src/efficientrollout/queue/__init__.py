"""Redis Streams queue between trainers and engines."""

from .keys import RedisKeys
from .server import RedisServer
from .streams import Claimed, RolloutQueue

__all__ = ["Claimed", "RedisKeys", "RedisServer", "RolloutQueue"]
