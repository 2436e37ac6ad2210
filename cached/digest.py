"""The digest of an image: the first consumer of a fill's byte stream
(cached/fill/consumers.py), and what re-verifies a file (cached/store/integrity.py).

``feed`` and ``catch_up`` run in a worker thread, in stream order: hashlib releases the GIL
on large buffers, so hashing proceeds beside the event loop's network I/O on another core.
``matched`` is read on the loop once ``catch_up`` has run.
"""

from __future__ import annotations

import hashlib
import os

Buffer = bytes | memoryview

_READ = 4 << 20


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
        self.matched = False  # set by catch_up once every byte was hashed
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

    def catch_up(self, fd: int, size: int) -> None:
        """Hash the bytes not seen in the stream from ``fd``. Call from a thread."""
        while self.position < size:
            data = os.pread(fd, min(_READ, size - self.position), self.position)
            if not data:
                return  # the file is short: ``matched`` stays False
            self._hash.update(data)
            self.position += len(memoryview(data))
        self.matched = self._hash.hexdigest() == self.expected

    def finish(self, fd: int, size: int) -> bool:
        """:meth:`catch_up`, then whether the digest matched. Call from a thread."""
        self.catch_up(fd, size)
        return self.matched

    def report(self) -> None:
        """Nothing to tell as it streams: the fill reads ``matched`` once caught up."""

    def hexdigest(self) -> str:
        return self._hash.hexdigest()
