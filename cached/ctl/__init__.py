"""``cached-manage``, the operator's client for the cache management API of cached daemons."""

from cached.ctl.cli import main

__all__ = ["main"]
