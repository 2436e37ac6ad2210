"""One image on disk: a sparse file whose metadata lives in its own ``user.*`` xattrs.

The functions here block (call them from an executor) and change no :class:`Entry` that is
in the index: they take values and return results, and the event loop applies them (see
:mod:`cached.store.store` for who owns which field).

Reading an entry back (:func:`parse`) trusts nothing: every xattr is checked against the file
and the store's rules, and anything that does not fit raises ValueError (the store then moves
the file to ``invalid/``). The bookkeeping values (hits, access times) fall back to 0 instead:
a wrong counter must not cost a cached image.
"""

from __future__ import annotations

import asyncio
import enum
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cached.store import codec, xattrs
from cached.store.chunks import Bitmap, chunk_count, chunk_size_for
from cached.store.written import Identity

MAX_SIZE = 1 << 50  # 1 PiB: no image is larger; bounds every number derived from a size
_HEX = re.compile(r"[0-9a-fA-F]*")
FORMAT_MAX = 64  # characters of a declared disk or container format kept in the metadata
_ALGO = re.compile(r"[a-z0-9_]{1,32}")


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
    # What the image record declared (issue 18: the record is rebuilt from the entry);
    # None in entries from before they were kept, or when the record had none.
    disk_format: str | None = None
    container_format: str | None = None
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
    # A complete entry's file as it should stat now (after our own last write); None until
    # the commit record is written or checked. See cached/store/written.py. These two fields
    # are read and written by any thread holding ``identity_lock`` (cached/store/integrity.py).
    identity: Identity | None = field(default=None, compare=False)
    # The file may have changed since it was verified: re-verify before serving it again.
    suspect: bool = field(default=False, compare=False)
    # The file's own token (``user.cached.token``, set as it is created; None for a file
    # from before it existed): a delete or an eviction unlinks this file only, never the
    # image's next entry at the same path. (Not the inode: FUSE may renumber it.)
    token: bytes | None = field(default=None, compare=False)
    identity_lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

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
    disk_format: str | None = None,
    container_format: str | None = None,
) -> Entry:
    """Create the sparse file at ``path`` (full size, no data) and its metadata."""
    chunk = chunk_size_for(size)
    count = chunk_count(size, chunk)
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
        disk_format=disk_format,
        container_format=container_format,
        last_accessed=now,
        last_modified=now,
    )
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    try:
        entry.token = os.urandom(8).hex().encode()
        os.ftruncate(fd, size)
        meta = {
            "size": size,
            "chunk_size": chunk,
            "checksum": checksum,
            "os_hash_algo": os_hash_algo,
            "os_hash_value": os_hash_value,
        }
        for key, value in (("disk_format", disk_format), ("container_format", container_format)):
            if value is not None:
                meta[key] = value  # absent, not null: the metadata of older entries
        xattrs.write_many(
            fd,
            {
                xattrs.META: codec.dumps(meta),
                xattrs.STATE: State.FILLING.value.encode(),
                xattrs.BITMAP: entry.present.to_bytes(),
                xattrs.HITS: b"0",
                xattrs.LAST_ACCESSED: repr(now).encode(),
                xattrs.LAST_MODIFIED: repr(now).encode(),
                xattrs.TOKEN: entry.token,
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
    fd = os.open(path, os.O_RDONLY)
    try:
        return parse(path, xattrs.read_all(fd), os.fstat(fd))
    finally:
        os.close(fd)


def parse(path: Path, attrs: dict[str, bytes], st: os.stat_result) -> Entry:
    """The entry described by ``attrs`` (a file's ``user.*`` xattrs) for the file ``st``.

    Raises ValueError, naming the file and the first rule broken: the metadata is not a
    bounded JSON object; ``size`` is not an integer equal to the file's size; ``chunk_size``
    is not what :func:`chunk_size_for` gives for that size; the bitmap is not exactly the
    length that size and chunk size imply (or claims chunks past the last); the state is not
    one of ours; a checksum is not hex.
    """
    try:
        meta = codec.loads_object(_required(attrs, xattrs.META))
        size = codec.int_field(meta, "size", low=0, high=MAX_SIZE)
        if size != st.st_size:
            raise ValueError(f"file is {st.st_size} bytes, metadata says {size}")
        chunk = codec.int_field(meta, "chunk_size", low=1, high=MAX_SIZE)
        if chunk != chunk_size_for(size):
            raise ValueError(
                f"chunk_size {chunk} for {size} bytes (the store uses {chunk_size_for(size)})"
            )
        count = chunk_count(size, chunk)
        raw_bitmap = attrs.get(xattrs.BITMAP)
        present = Bitmap(count) if raw_bitmap is None else Bitmap.decode(count, raw_bitmap)
        raw_state = _required(attrs, xattrs.STATE)
        state = next((s for s in State if s.value.encode() == raw_state), None)
        if state is None:
            raise ValueError(f"state {raw_state[:32]!r}")
        checksum = _hex(meta, "checksum")
        algo = codec.str_field(meta, "os_hash_algo", max_len=32)
        if algo is not None and not _ALGO.fullmatch(algo):
            raise ValueError(f"os_hash_algo {algo!r}")
        hash_value = _hex(meta, "os_hash_value")
        disk_format = codec.str_field(meta, "disk_format", max_len=FORMAT_MAX)
        container_format = codec.str_field(meta, "container_format", max_len=FORMAT_MAX)
    except ValueError as exc:
        raise ValueError(f"{path}: bad cache metadata: {exc}") from None
    error = attrs.get(xattrs.ERROR)
    return Entry(
        image_id=path.name,
        path=path,
        size=size,
        chunk_size=chunk,
        state=state,
        present=present,
        checksum=checksum,
        os_hash_algo=algo,
        os_hash_value=hash_value,
        disk_format=disk_format,
        container_format=container_format,
        hits=_int(attrs.get(xattrs.HITS)),
        last_accessed=_float(attrs.get(xattrs.LAST_ACCESSED)),
        last_modified=_float(attrs.get(xattrs.LAST_MODIFIED)),
        error=None if error is None else error[:1024].decode(errors="replace"),
    )


def _required(attrs: dict[str, bytes], name: str) -> bytes:
    if name not in attrs:
        raise ValueError(f"no {name}")
    return attrs[name]


def _hex(meta: dict[str, Any], name: str) -> str | None:
    value = codec.str_field(meta, name, max_len=256)
    if value is not None and not _HEX.fullmatch(value):
        raise ValueError(f"{name} is not hex")
    return value


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


def read_token(target: Path) -> bytes | None:
    """The file's entry token (``user.cached.token``), None if it has none."""
    return xattrs.read(target, xattrs.TOKEN)


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
    if raw is None or len(raw) > 20:
        return 0
    try:
        value = int(raw)
    except ValueError:
        return 0
    return value if 0 <= value < 1 << 63 else 0


def _float(raw: bytes | None) -> float:
    if raw is None or len(raw) > 32:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) and value >= 0 else 0.0
