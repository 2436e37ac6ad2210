"""The on-disk store on its own: chunk sizes, the presence bitmap, entries and their xattrs,
the index rebuilt from the directory tree, the prefetch queue. Real files, real xattrs.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from blockbuster import BlockingError
from conftest import tree

from cached.ids import is_image_id
from cached.store import Bitmap, Entry, State, Store, chunk_size_for, xattrs
from cached.store import entry as entries
from cached.store.chunks import MAX_CHUNKS, MIN_CHUNK

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


T = TypeVar("T")


def run(step: Coroutine[Any, Any, T]) -> T:
    """Run one of the store's loop-side operations from a plain test."""
    return asyncio.run(step)


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "cache")
    s.root.mkdir()
    run(s.open())
    return s


def publish(entry: Entry, chunks: set[int]) -> None:
    """Write ``chunks``, flush them and record them as present, as a fill does."""
    entry.present.update(chunks)
    entry.last_modified = time.time()
    fd = os.open(entry.path, os.O_RDWR)
    try:
        for c in chunks:
            start, end = entry.chunk_bounds(c)
            os.pwrite(fd, os.urandom(end - start), start)
        os.fdatasync(fd)
        entries.record_present(fd, entry.present.to_bytes(), entry.last_modified)
    finally:
        os.close(fd)


def fill_file(path: Path, data: bytes) -> None:
    with path.open("r+b") as f:
        f.write(data)


# ------------------------------------------------------------------ chunks


@pytest.mark.parametrize(
    ("size", "chunk"),
    [
        (0, 4 * MiB),
        (1, 4 * MiB),
        (4 * MiB, 4 * MiB),
        (32 * GiB, 4 * MiB),  # 8192 chunks of 4 MiB
        (32 * GiB + 1, 8 * MiB),
        (64 * GiB, 8 * MiB),
        (1 * TiB, 128 * MiB),
        (2 * TiB, 256 * MiB),
    ],
)
def test_chunk_size_for_known_sizes(size: int, chunk: int) -> None:
    assert chunk_size_for(size) == chunk


def test_bitmap_fits_1_kib_and_chunks_are_at_least_4_mib_up_to_2_tib() -> None:
    sizes = {0, 1, 2 * TiB}
    for shift in range(0, 42):
        for delta in (-1, 0, 1):
            if 0 <= (1 << shift) + delta <= 2 * TiB:
                sizes.add((1 << shift) + delta)
    sizes.update(range(0, 2 * TiB + 1, 2 * TiB // 997))
    for size in sorted(sizes):
        chunk = chunk_size_for(size)
        count = max(1, -(-size // chunk))
        assert chunk >= MIN_CHUNK == 4 * MiB, size
        assert chunk & (chunk - 1) == 0, size  # a power of two
        assert count <= MAX_CHUNKS, size
        assert (count + 7) // 8 <= 1024, size
        # never bigger than needed: half the chunk would overflow the bitmap
        assert chunk == MIN_CHUNK or -(-size // (chunk // 2)) > MAX_CHUNKS, size


# ------------------------------------------------------------------ bitmap


def test_bitmap_bit_i_is_bit_i_mod_8_of_byte_i_div_8() -> None:
    b = Bitmap(10)
    assert b.to_bytes() == b"\x00\x00"
    assert len(b) == 0 and not b.full() and list(b) == []
    b.add(0)
    b.add(9)
    b.add(3)
    assert b.to_bytes() == b"\x09\x02"
    assert list(b) == [0, 3, 9] and len(b) == 3
    assert 3 in b and 4 not in b and 9 in b
    assert -1 not in b and 10 not in b and 1000 not in b
    b.update(range(10))
    assert b.full() and b.to_bytes() == b"\xff\x03"


def test_bitmap_rejects_out_of_range_and_wrong_length() -> None:
    b = Bitmap(9)
    with pytest.raises(IndexError):
        b.add(9)
    with pytest.raises(IndexError):
        b.add(-1)
    with pytest.raises(ValueError, match="bitmap of 1 bytes for 9 chunks"):
        Bitmap(9, b"\x00")
    assert list(Bitmap(9, b"\x01\x01")) == [0, 8]


def test_bitmap_copy_is_independent() -> None:
    a = Bitmap(16, b"\x01\x00")
    b = a.copy()
    b.add(15)
    assert list(a) == [0] and list(b) == [0, 15]


def test_single_chunk_bitmap() -> None:
    b = Bitmap(1)
    b.add(0)
    assert b.full() and b.to_bytes() == b"\x01"


# ------------------------------------------------------------------ entries


def test_create_writes_a_sparse_file_and_literal_xattrs(store: Store) -> None:
    image_id = new_id()
    entry = run(
        store.create(
            image_id, 10 * MiB + 5, checksum="c0ffee", os_hash_algo="sha512", os_hash_value="beef"
        )
    )
    path = store.root / "incomplete" / image_id
    assert entry.path == path
    assert tree(store.root) == ["incomplete/", f"incomplete/{image_id}", "invalid/", "queue/"]
    st = os.stat(path)
    assert st.st_size == 10 * MiB + 5
    assert st.st_blocks * 512 <= 8192  # sparse: no data until it arrives (an xattr block)
    assert oct(st.st_mode & 0o777) == oct(0o640)
    attrs = xattrs.read_all(path)
    assert sorted(attrs) == [
        "user.cached.bitmap",
        "user.cached.last_accessed",
        "user.cached.last_modified",
        "user.cached.meta",
        "user.cached.state",
        "user.cached.token",
        "user.hits",
    ]
    assert attrs["user.cached.token"] == entry.token and len(entry.token) == 16
    assert attrs["user.cached.meta"] == (
        b'{"size":10485765,"chunk_size":4194304,"checksum":"c0ffee",'
        b'"os_hash_algo":"sha512","os_hash_value":"beef"}'
    )
    assert attrs["user.cached.state"] == b"filling"
    assert attrs["user.cached.bitmap"] == b"\x00"  # 3 chunks
    assert attrs["user.hits"] == b"0"
    assert float(attrs["user.cached.last_accessed"]) == entry.last_accessed > 0
    assert float(attrs["user.cached.last_modified"]) == entry.last_modified > 0


def test_create_then_load_round_trip(store: Store) -> None:
    image_id = new_id()
    made = run(
        store.create(image_id, 9 * MiB, checksum=None, os_hash_algo=None, os_hash_value=None)
    )
    publish(made, {0, 2})
    assert xattrs.read_all(made.path)["user.cached.bitmap"] == b"\x05"
    run(store.touch(made, hit=True))
    run(store.touch(made, hit=True))
    run(store.touch(made, hit=False))
    assert xattrs.read_all(made.path)["user.hits"] == b"2"

    loaded = entries.load(made.path)
    assert loaded.image_id == image_id
    assert (loaded.size, loaded.chunk_size, loaded.chunk_count) == (9 * MiB, 4 * MiB, 3)
    assert loaded.state is State.FILLING
    assert list(loaded.present) == [0, 2]
    assert (loaded.checksum, loaded.os_hash_algo, loaded.os_hash_value) == (None, None, None)
    assert loaded.hits == 2
    assert loaded.last_accessed == made.last_accessed
    assert loaded.error is None
    assert loaded.present_bytes() == 4 * MiB + 1 * MiB
    assert loaded.chunk_bounds(2) == (8 * MiB, 9 * MiB)
    assert loaded.chunks_of(4 * MiB - 1, 4 * MiB + 1) == range(0, 2)


def test_publish_persists_last_modified(store: Store) -> None:
    """The clean job judges partial entries by last_modified: a restart must not reset it."""
    made = run(
        store.create(new_id(), 9 * MiB, checksum=None, os_hash_algo=None, os_hash_value=None)
    )
    created = made.last_modified
    publish(made, {1})
    assert made.last_modified > created
    assert entries.load(made.path).last_modified == made.last_modified


def test_load_rejects_a_file_whose_size_disagrees(store: Store) -> None:
    entry = run(
        store.create(new_id(), 5 * MiB, checksum=None, os_hash_algo=None, os_hash_value=None)
    )
    os.truncate(entry.path, 4 * MiB)
    with pytest.raises(ValueError, match="metadata says 5242880"):
        entries.load(entry.path)


def test_commit_invalidate_and_their_xattrs(store: Store) -> None:
    good, bad = new_id(), new_id()
    a = run(store.create(good, 100, checksum=None, os_hash_algo=None, os_hash_value=None))
    b = run(store.create(bad, 100, checksum=None, os_hash_algo=None, os_hash_value=None))
    assert run(store.commit(a)) is True
    run(store.invalidate(b, "sha512 mismatch: got x, expected y"))
    assert tree(store.root) == sorted(["incomplete/", "invalid/", f"invalid/{bad}", "queue/", good])
    assert xattrs.read_all(store.root / good)["user.cached.state"] == b"complete"
    attrs = xattrs.read_all(store.root / "invalid" / bad)
    assert attrs["user.cached.state"] == b"invalid"
    assert attrs["user.error"] == b"sha512 mismatch: got x, expected y"
    assert store.get(good) is a and a.complete and a.path == store.root / good
    assert store.get(bad) is None and store.invalid == {bad}
    assert run(store.remove_invalid(bad)) is True and run(store.remove_invalid(bad)) is False
    assert store.invalid == set()


# ------------------------------------------------------------------ the index


def test_open_rebuilds_the_index_from_the_tree(store: Store) -> None:
    done, partial, broken = new_id(), new_id(), new_id()
    a = run(store.create(done, 6 * MiB, checksum="aa", os_hash_algo=None, os_hash_value=None))
    run(store.commit(a))
    run(store.touch(a, hit=True))
    b = run(
        store.create(partial, 20 * MiB, checksum=None, os_hash_algo="sha256", os_hash_value="bb")
    )
    publish(b, {1, 3})
    c = run(store.create(broken, 10, checksum=None, os_hash_algo=None, os_hash_value=None))
    run(store.invalidate(c, "md5 mismatch"))
    store.enqueue(done)

    again = Store(store.root)
    run(again.open())
    assert sorted(again.entries) == sorted([done, partial])
    assert again.invalid == {broken}
    e = again.get(done)
    assert e is not None and e.complete and e.path == store.root / done
    assert (e.size, e.checksum, e.hits) == (6 * MiB, "aa", 1)
    p = again.get(partial)
    assert (
        p is not None and p.state is State.FILLING and p.path == store.root / "incomplete" / partial
    )
    assert list(p.present) == [1, 3] and p.chunk_count == 5
    assert (p.os_hash_algo, p.os_hash_value) == ("sha256", "bb")
    assert [x.image_id for x in again.complete_entries()] == [done]
    assert [x.image_id for x in again.partial_entries()] == [partial]
    assert again.total_size() == 6 * MiB + 8 * MiB
    assert again.queued() == [done]
    assert tree(again.root) == tree(store.root)  # opening changes nothing on disk


def test_open_moves_partial_files_without_usable_metadata_to_invalid(store: Store) -> None:
    garbage, bare, short, good, wrong = new_id(), new_id(), new_id(), new_id(), new_id()
    incomplete = store.root / "incomplete"
    (incomplete / garbage).write_bytes(b"x" * 1000)
    xattrs.write(incomplete / garbage, "user.cached.meta", b"{not json")
    xattrs.write(incomplete / garbage, "user.cached.state", b"filling")
    (incomplete / bare).write_bytes(b"y" * 1000)  # no xattrs at all: Glance's, left alone
    e = run(store.create(short, 8 * MiB, checksum=None, os_hash_algo=None, os_hash_value=None))
    os.truncate(e.path, MiB)  # the file lost its tail
    run(store.create(good, MiB, checksum=None, os_hash_algo=None, os_hash_value=None))
    wrong_bitmap = run(
        store.create(wrong, MiB, checksum=None, os_hash_algo=None, os_hash_value=None)
    )
    xattrs.write(wrong_bitmap.path, "user.cached.bitmap", b"\x01\x02\x03")  # wrong length

    again = Store(store.root)
    run(again.open())
    assert list(again.entries) == [good]
    unusable = sorted([garbage, short, wrong])
    assert tree(again.root) == sorted(
        ["incomplete/", f"incomplete/{good}", f"incomplete/{bare}", "invalid/", "queue/"]
        + [f"invalid/{i}" for i in unusable]
    )
    assert again.invalid == set(unusable)  # the clean job removes them


def test_open_ignores_foreign_files_and_invalidates_unusable_image_files(store: Store) -> None:
    image_id = new_id()
    run(
        store.commit(
            run(store.create(image_id, 10, checksum=None, os_hash_algo=None, os_hash_value=None))
        )
    )
    root = store.root
    (root / "README").write_text("not an image")
    (root / "lost+found").mkdir()
    (root / (image_id[:-1] + "g")).write_text("not a uuid")
    (root / ".xattr-probe-1").write_bytes(b"")
    (root / "queue" / "notes.txt").write_text("")
    bad_complete = new_id()  # an image id in the root without usable metadata
    (root / bad_complete).write_bytes(b"z" * 10)
    xattrs.write(root / bad_complete, "user.cached.meta", b"{not json")
    glance_file = new_id()  # no cached xattr at all: Glance's, left for adoption
    (root / glance_file).write_bytes(b"g" * 10)
    filling_in_root = new_id()
    run(store.create(filling_in_root, 10, checksum=None, os_hash_algo=None, os_hash_value=None))
    os.rename(root / "incomplete" / filling_in_root, root / filling_in_root)
    foreign = [p for p in tree(root) if bad_complete not in p and filling_in_root not in p]

    again = Store(root)
    run(again.open())
    assert list(again.entries) == [image_id]
    assert again.queued() == []
    # Foreign files stay where they are; image files that cannot be served go to invalid/
    # (before: ignored forever, never counted, never cleaned).
    assert tree(root) == sorted(foreign + [f"invalid/{bad_complete}", f"invalid/{filling_in_root}"])
    assert again.invalid == {bad_complete, filling_in_root}
    assert again.foreign == {glance_file} and again.get(glance_file) is None
    assert xattrs.read_all(root / "invalid" / bad_complete)["user.cached.state"] == b"invalid"


def test_open_on_an_empty_directory_makes_the_layout(tmp_path: Path) -> None:
    s = Store(tmp_path)
    run(s.open())
    assert tree(tmp_path) == ["incomplete/", "invalid/", "queue/"]
    assert s.entries == {} and s.invalid == set() and s.total_size() == 0


def test_create_replaces_a_stale_partial(store: Store) -> None:
    image_id = new_id()
    stale = store.root / "incomplete" / image_id
    stale.write_bytes(b"old" * 100)
    entry = run(store.create(image_id, MiB, checksum=None, os_hash_algo=None, os_hash_value=None))
    assert os.stat(entry.path).st_size == MiB and os.stat(entry.path).st_blocks * 512 <= 8192
    with pytest.raises(ValueError, match="not an image id"):
        run(store.create("../etc", 1, checksum=None, os_hash_algo=None, os_hash_value=None))


# ------------------------------------------------------------------ the queue


def test_queue_is_ordered_by_mtime(store: Store) -> None:
    a, b, c = new_id(), new_id(), new_id()
    for image_id in (a, b, c):
        assert store.enqueue(image_id) is True
    assert store.enqueue(b) is False  # already queued
    for image_id, mtime in ((a, 3000), (b, 1000), (c, 2000)):
        os.utime(store.queue_dir / image_id, (mtime, mtime))
    assert store.queued() == [b, c, a]
    assert store.dequeue(c) is True and store.dequeue(c) is False
    assert store.queued() == [b, a]
    assert tree(store.queue_dir) == sorted([a, b])
    assert all(os.stat(store.queue_dir / i).st_size == 0 for i in (a, b))
    with pytest.raises(ValueError):
        store.enqueue("not-an-id")
    with pytest.raises(ValueError):
        store.dequeue("../x")


# ------------------------------------------------------------------ removal


def test_remove_while_a_reader_has_the_file_open(store: Store) -> None:
    image_id = new_id()
    data = os.urandom(3 * MiB)
    entry = run(
        store.create(image_id, len(data), checksum=None, os_hash_algo=None, os_hash_value=None)
    )
    fill_file(entry.path, data)
    assert run(store.commit(entry))
    with open(store.root / image_id, "rb") as reader:
        first = reader.read(MiB)
        removed = run(store.remove(image_id))
        assert removed is entry and entry.removed
        assert store.get(image_id) is None
        assert not (store.root / image_id).exists()
        assert first + reader.read() == data  # the open file outlives its name
    assert tree(store.root) == ["incomplete/", "invalid/", "queue/"]
    assert run(store.remove(image_id)) is None
    run(store.touch(entry, hit=True))  # a late touch of a removed entry recreates nothing
    assert tree(store.root) == ["incomplete/", "invalid/", "queue/"]


def test_removed_partial_is_never_committed(store: Store) -> None:
    image_id = new_id()
    entry = run(store.create(image_id, 10, checksum=None, os_hash_algo=None, os_hash_value=None))
    with open(entry.path, "rb") as reader:
        run(store.remove(image_id))
        assert run(store.commit(entry)) is False
        assert reader.read() == b"\0" * 10
    assert tree(store.root) == ["incomplete/", "invalid/", "queue/"]
    run(store.invalidate(entry, "late"))  # nor moved to invalid/
    assert tree(store.root) == ["incomplete/", "invalid/", "queue/"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (str(uuid.UUID(int=1)), True),
        ("3c6b9a1e-8f0e-4c1a-9d6b-2a7c5e4f1b0a", True),
        ("3c6b9a1e8f0e4c1a9d6b2a7c5e4f1b0a", False),
        ("{3c6b9a1e-8f0e-4c1a-9d6b-2a7c5e4f1b0a}", False),
        ("../3c6b9a1e-8f0e-4c1a-9d6b-2a7c5e4f1b0a", False),
        ("", False),
        ("incomplete", False),
    ],
)
def test_is_image_id(value: str, expected: bool) -> None:
    assert is_image_id(value) is expected


def test_meta_is_compact_json(store: Store) -> None:
    entry = run(store.create(new_id(), 1, checksum="x", os_hash_algo=None, os_hash_value=None))
    meta = xattrs.read_all(entry.path)["user.cached.meta"]
    assert json.loads(meta) == {
        "size": 1,
        "chunk_size": 4 * MiB,
        "checksum": "x",
        "os_hash_algo": None,
        "os_hash_value": None,
    }
    assert b" " not in meta


async def test_the_loop_checker_catches_xattr_calls_of_cached(tmp_path: Path) -> None:
    """The autouse fixture's additions to blockbuster are live: cached's xattr helpers called
    on the event loop fail the test (the same helpers in a thread are fine)."""
    path = tmp_path / "f"
    path.write_bytes(b"x")
    with pytest.raises(BlockingError, match="xattr"):
        xattrs.write(path, xattrs.HITS, b"1")
    with pytest.raises(BlockingError, match="xattr"):
        xattrs.read_all(path)
    await asyncio.to_thread(xattrs.write, path, xattrs.HITS, b"1")
    assert (await asyncio.to_thread(xattrs.read_all, path))[xattrs.HITS] == b"1"
