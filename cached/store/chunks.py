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


def chunk_count(size: int, chunk: int) -> int:
    """How many chunks of ``chunk`` bytes an image of ``size`` bytes has (an empty one: 1)."""
    return max(1, -(-size // chunk))


class Bitmap:
    """A set of chunk numbers ``0 <= i < count`` stored one bit each (bit i of byte i // 8)."""

    __slots__ = ("count", "_bits")

    def __init__(self, count: int, bits: bytes | None = None):
        self.count = count
        nbytes = (count + 7) // 8
        if bits is not None and len(bits) != nbytes:
            raise ValueError(f"bitmap of {len(bits)} bytes for {count} chunks")
        self._bits = bytearray(bits) if bits is not None else bytearray(nbytes)

    @classmethod
    def decode(cls, count: int, raw: bytes) -> Bitmap:
        """The bitmap of ``count`` chunks stored as ``raw`` (``user.cached.bitmap``).

        Raises ValueError unless ``1 <= count <= MAX_CHUNKS``, ``raw`` is exactly
        ``(count + 7) // 8`` bytes and the padding bits past ``count`` are clear.
        """
        if not 1 <= count <= MAX_CHUNKS:
            raise ValueError(f"{count} chunks (1 to {MAX_CHUNKS})")
        if len(raw) != (count + 7) // 8:
            raise ValueError(f"bitmap of {len(raw)} bytes for {count} chunks")
        if count % 8 and raw[-1] >> (count % 8):
            raise ValueError(f"bitmap claims chunks past the last ({count - 1})")
        return cls(count, raw)

    def __contains__(self, i: int) -> bool:
        return 0 <= i < self.count and bool(self._bits[i >> 3] & (1 << (i & 7)))

    def add(self, i: int) -> None:
        if not 0 <= i < self.count:
            raise IndexError(i)
        self._bits[i >> 3] |= 1 << (i & 7)

    def discard(self, i: int) -> None:
        if 0 <= i < self.count:
            self._bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF

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
