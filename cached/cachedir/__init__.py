"""The cache directory as a mount: its guard, what a mount is, the declared directories, and
re-verifying entries before a hit.
"""
