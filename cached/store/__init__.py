"""The on-disk cache: sparse files with their metadata in xattrs. Sync code, no event loop."""

from cached.store.chunks import Bitmap, chunk_size_for
from cached.store.entry import Entry, State
from cached.store.store import Store

__all__ = ["Bitmap", "Entry", "State", "Store", "chunk_size_for"]
