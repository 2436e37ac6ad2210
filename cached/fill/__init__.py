"""The fill: one transfer per image into the cache, shared by every reader (registry, state
machine, write pipeline, and its byte sources and stream consumers).
"""
