"""The cache management API (answered by the daemon itself, never proxied) and who may use it."""
