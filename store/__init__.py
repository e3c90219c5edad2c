"""The Zarr store: the one place that knows the on-disk format (see FORMAT.md)."""

from .format import FormatError
from .reader import Case, Store, open_store

__all__ = ["Case", "FormatError", "Store", "open_store"]
