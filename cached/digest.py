"""Consumers of a fill's byte stream. The digest is the first; format inspectors can follow.

``feed`` runs in a worker thread, in stream order: hashlib releases the GIL on large buffers,
so hashing proceeds beside the event loop's network I/O on another core.
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol

Buffer = bytes | memoryview

_READ = 4 << 20


class StreamConsumer(Protocol):
    def feed(self, offset: int, data: Buffer) -> None:
        """Take ``data`` found at ``offset``; called in order from one worker thread."""


class Digest:
    """A sequential digest over the image, fed while it streams and caught up from disk.

    Bytes that arrive out of order (ranged fills, resumed entries) are not hashed as they
    pass; :meth:`finish` reads whatever the stream skipped back from the file, in one
    sequential pass, before comparing.
    """

    def __init__(self, algo: str, expected: str):
        self.algo = algo
        self.expected = expected.lower()
        self.position = 0
        self._hash = hashlib.new(algo)

    @classmethod
    def for_record(
        cls, checksum: str | None, os_hash_algo: str | None, os_hash_value: str | None
    ) -> Digest | None:
        """The digest Glance would check: the secure hash, else the md5 ``checksum``."""
        if os_hash_algo and os_hash_value and os_hash_algo in hashlib.algorithms_available:
            return cls(os_hash_algo, os_hash_value)
        if checksum:
            return cls("md5", checksum)
        return None

    def feed(self, offset: int, data: Buffer) -> None:
        if offset == self.position:
            self._hash.update(data)
            self.position += len(memoryview(data))

    def finish(self, fd: int, size: int) -> bool:
        """Hash the bytes not seen in the stream from ``fd`` and compare. Call from a thread."""
        while self.position < size:
            data = os.pread(fd, min(_READ, size - self.position), self.position)
            if not data:
                return False
            self._hash.update(data)
            self.position += len(memoryview(data))
        return self._hash.hexdigest() == self.expected

    def hexdigest(self) -> str:
        return self._hash.hexdigest()
