"""The SGLang backend: each engine process owns an SGLang server and serves its waves through it."""

from .config import SGLangConfig
from .engine import SGLangEngine

__all__ = ["SGLangConfig", "SGLangEngine"]
