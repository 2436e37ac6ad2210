"""One image on disk: a sparse file whose metadata lives in its own ``user.*`` xattrs.

The functions here block (call them from an executor) and change no :class:`Entry` that is
in the index: they take values and return results, and the event loop applies them (see
:mod:`cached.store.store` for who owns which field).
"""

from __future__ import annotations

import asyncio
import enum
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from cached.store import xattrs
from cached.store.chunks import Bitmap, chunk_size_for


class State(enum.Enum):
    FILLING = "filling"
    COMPLETE = "complete"
    INVALID = "invalid"


@dataclass
class Entry:
    """What the cache knows about one image; mirrors the file's xattrs.

    ``present`` only ever holds chunks whose bytes were written *and* flushed (fdatasync)
    before the bit was persisted, so a crash can lose chunks but never invent them.
    """

    image_id: str
    path: Path
    size: int
    chunk_size: int
    state: State
    present: Bitmap
    checksum: str | None = None
    os_hash_algo: str | None = None
    os_hash_value: str | None = None
    hits: int = 0
    last_accessed: float = 0.0
    last_modified: float = 0.0
    error: str | None = None
    # Set when the entry was deleted while someone still had it open: never re-commit it.
    removed: bool = field(default=False, compare=False)
    # Readers currently serving from the file; pruning skips entries in use.
    readers: int = field(default=0, compare=False)
    # Bytes a running fill may still write beyond ``present`` (space accounting).
    reserved: int = field(default=0, compare=False)
    # Serialises commit, invalidate and delete of this entry (see Store).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, compare=False, repr=False)

    @property
    def chunk_count(self) -> int:
        return self.present.count

    def chunk_bounds(self, i: int) -> tuple[int, int]:
        """Byte range ``[start, end)`` of chunk ``i``."""
        start = i * self.chunk_size
        return start, min(start + self.chunk_size, self.size)

    def chunks_of(self, start: int, end: int) -> range:
        """Chunk numbers covering bytes ``[start, end)``."""
        if end <= start:
            return range(0)
        return range(start // self.chunk_size, (end - 1) // self.chunk_size + 1)

    @property
    def complete(self) -> bool:
        return self.state is State.COMPLETE

    def present_bytes(self) -> int:
        return sum(self.chunk_bounds(i)[1] - self.chunk_bounds(i)[0] for i in self.present)

    def footprint(self) -> int:
        """Bytes this entry holds on disk, or may hold once its running fill is done."""
        if self.complete:
            return self.size
        return min(self.size, self.present_bytes() + self.reserved)


def create(
    path: Path,
    image_id: str,
    size: int,
    *,
    checksum: str | None,
    os_hash_algo: str | None,
    os_hash_value: str | None,
) -> Entry:
    """Create the sparse file at ``path`` (full size, no data) and its metadata."""
    chunk = chunk_size_for(size)
    count = max(1, -(-size // chunk))
    now = time.time()
    entry = Entry(
        image_id=image_id,
        path=path,
        size=size,
        chunk_size=chunk,
        state=State.FILLING,
        present=Bitmap(count),
        checksum=checksum,
        os_hash_algo=os_hash_algo,
        os_hash_value=os_hash_value,
        last_accessed=now,
        last_modified=now,
    )
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    try:
        os.ftruncate(fd, size)
        meta = {
            "size": size,
            "chunk_size": chunk,
            "checksum": checksum,
            "os_hash_algo": os_hash_algo,
            "os_hash_value": os_hash_value,
        }
        xattrs.write_many(
            fd,
            {
                xattrs.META: json.dumps(meta, separators=(",", ":")).encode(),
                xattrs.STATE: State.FILLING.value.encode(),
                xattrs.BITMAP: entry.present.to_bytes(),
                xattrs.HITS: b"0",
                xattrs.LAST_ACCESSED: repr(now).encode(),
                xattrs.LAST_MODIFIED: repr(now).encode(),
            },
        )
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return entry


def load(path: Path) -> Entry:
    """Read an entry back from its file; raises ValueError if the metadata is unusable."""
    attrs = xattrs.read_all(path)
    try:
        meta = json.loads(attrs[xattrs.META])
        size = int(meta["size"])
        chunk = int(meta["chunk_size"])
        state = State(attrs[xattrs.STATE].decode())
        count = max(1, -(-size // chunk))
        bitmap = Bitmap(count, attrs.get(xattrs.BITMAP, bytes((count + 7) // 8)))
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: bad cache metadata: {exc}") from None
    if os.stat(path).st_size != size:
        raise ValueError(f"{path}: file is {os.stat(path).st_size} bytes, metadata says {size}")
    return Entry(
        image_id=path.name,
        path=path,
        size=size,
        chunk_size=chunk,
        state=state,
        present=bitmap,
        checksum=meta.get("checksum"),
        os_hash_algo=meta.get("os_hash_algo"),
        os_hash_value=meta.get("os_hash_value"),
        hits=_int(attrs.get(xattrs.HITS)),
        last_accessed=_float(attrs.get(xattrs.LAST_ACCESSED)),
        last_modified=_float(attrs.get(xattrs.LAST_MODIFIED)),
        error=(attrs[xattrs.ERROR].decode(errors="replace") if xattrs.ERROR in attrs else None),
    )


def record_present(fd: int, bitmap: bytes, stamp: float) -> None:
    """Persist a presence bitmap. The caller has already fdatasync'ed the bytes it adds."""
    xattrs.write_many(fd, {xattrs.BITMAP: bitmap, xattrs.LAST_MODIFIED: repr(stamp).encode()})


def write_states(target: int | Path, state: State, error: str | None = None) -> None:
    """Record ``state`` (and an error message, Glance's ``user.error``) on the file."""
    values = {xattrs.STATE: state.value.encode()}
    if error is not None:
        values[xattrs.ERROR] = error.encode()
    xattrs.write_many(target, values)


def write_state(target: Path, state: State) -> None:
    """Record ``state`` on the file only (the caller updates the Entry when it is visible)."""
    xattrs.write(target, xattrs.STATE, state.value.encode())


def write_values(target: Path, values: dict[str, bytes]) -> None:
    xattrs.write_many(target, values)


def access_values(entry: Entry, *, hit: bool, now: float) -> dict[str, bytes]:
    """Count an access (and a hit) on ``entry`` and return the xattrs that record it.

    Runs on the event loop (it changes the entry); write the result with ``write_values``.
    Our own access stamp: atime lies on noatime mounts.
    """
    entry.last_accessed = now
    values = {xattrs.LAST_ACCESSED: repr(now).encode()}
    if hit:
        entry.hits += 1
        values[xattrs.HITS] = str(entry.hits).encode()
    return values


def _int(raw: bytes | None) -> int:
    try:
        return int(raw or b"0")
    except ValueError:
        return 0


def _float(raw: bytes | None) -> float:
    try:
        return float(raw or b"0")
    except ValueError:
        return 0.0
