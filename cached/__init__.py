"""cached: a node-local caching proxy for the OpenStack image service."""

__version__ = "0.1.0"
