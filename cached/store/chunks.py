"""Fixed-size chunks of an image and the bitmap that says which of them are on disk."""

from __future__ import annotations

from collections.abc import Iterator

MIN_CHUNK = 4 << 20
# ext4 keeps all xattrs of an inode in one block (4 KiB); 1 KiB of bitmap leaves room for the
# rest and still covers 2 TiB with 256 MiB chunks.
MAX_CHUNKS = 8192


def chunk_size_for(size: int) -> int:
    """The chunk size for an image of ``size`` bytes: 4 MiB, doubled until <= 8192 chunks."""
    chunk = MIN_CHUNK
    while chunk * MAX_CHUNKS < size:
        chunk *= 2
    return chunk


class Bitmap:
    """A set of chunk numbers ``0 <= i < count`` stored one bit each (bit i of byte i // 8)."""

    __slots__ = ("count", "_bits")

    def __init__(self, count: int, bits: bytes | None = None):
        self.count = count
        nbytes = (count + 7) // 8
        if bits is not None and len(bits) != nbytes:
            raise ValueError(f"bitmap of {len(bits)} bytes for {count} chunks")
        self._bits = bytearray(bits) if bits is not None else bytearray(nbytes)

    def __contains__(self, i: int) -> bool:
        return 0 <= i < self.count and bool(self._bits[i >> 3] & (1 << (i & 7)))

    def add(self, i: int) -> None:
        if not 0 <= i < self.count:
            raise IndexError(i)
        self._bits[i >> 3] |= 1 << (i & 7)

    def update(self, chunks: Iterator[int] | list[int] | set[int]) -> None:
        for i in chunks:
            self.add(i)

    def __iter__(self) -> Iterator[int]:
        return (i for i in range(self.count) if i in self)

    def __len__(self) -> int:
        return sum(bin(b).count("1") for b in self._bits)

    def full(self) -> bool:
        return len(self) == self.count

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def copy(self) -> Bitmap:
        return Bitmap(self.count, bytes(self._bits))
