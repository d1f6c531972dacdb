"""The .momos file: `save`, `load` and `inspect` (format in docs/format.md)."""

from momos.io.format import inspect, load, save

__all__ = ["inspect", "load", "save"]
