from .engine import EngineConfig, NativeEngine

__all__ = ["EngineConfig", "NativeEngine"]
