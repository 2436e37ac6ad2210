"""Property tests (hypothesis) for every codec of a stored xattr: the entry metadata JSON, the
presence bitmap, the commit record, the prefetch status. Arbitrary bytes raise nothing but the
documented ValueError; what we write reads back as written.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cached.jobs.prefetch import QueueStatus, parse_status, read_status, write_status
from cached.store import Bitmap, State, chunk_size_for, codec, xattrs
from cached.store import entry as entries
from cached.store.chunks import MAX_CHUNKS, chunk_count
from cached.store.written import Identity

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TiB = 1 << 40

json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=40)
json_scalars |= st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
# Bytes that look like our documents more often than random bytes do.
jsonish = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 5000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e400", b'{"size":1e400}']),
)


def stat_of(size: int) -> os.stat_result:
    return os.stat_result((0o100640, 1, 1, 1, 0, 0, size, 0, 0, 0))


# ------------------------------------------------------------------------ bounded JSON
@FUZZ
@given(jsonish)
def test_loads_object_raises_only_value_error(raw: bytes) -> None:
    try:
        doc = codec.loads_object(raw)
    except ValueError:
        return
    assert isinstance(doc, dict)


@FUZZ
@given(
    st.dictionaries(
        st.text(max_size=10),
        st.none()
        | st.booleans()
        | st.integers(-(10**30), 10**30)
        | st.text(max_size=30)
        | st.floats(allow_nan=False, allow_infinity=False),
        max_size=8,
    )
)
def test_loads_object_round_trip(doc: dict[str, object]) -> None:
    assert codec.loads_object(codec.dumps(doc)) == doc


def test_loads_object_rejects_before_recursing() -> None:
    for raw in (b"[" * 100_000, b'{"a":' * 3000 + b"1" + b"}" * 3000, b'"' + b"x" * 5000 + b'"'):
        with pytest.raises(ValueError):
            codec.loads_object(raw)
    assert codec.loads_object(b'{"s":"[[[[[[[[[[["}') == {"s": "[[[[[[[[[[["}  # in a string


# ------------------------------------------------------------------------ entry metadata
metas = st.one_of(
    jsonish,
    st.fixed_dictionaries(
        {"size": st.integers(-5, 3 * TiB) | json_scalars, "chunk_size": st.integers(-1, 1 << 30)},
        optional={
            "checksum": json_scalars,
            "os_hash_algo": json_scalars,
            "os_hash_value": json_scalars,
        },
    ).map(lambda d: json.dumps(d).encode()),
)


@FUZZ
@given(
    meta=metas,
    state=st.sampled_from([b"complete", b"filling", b"invalid"]) | st.binary(max_size=12),
    bitmap=st.none() | st.binary(max_size=1100),
    other=st.binary(max_size=30),
    file_size=st.integers(0, 3 * TiB),
)
def test_parse_raises_only_value_error(
    meta: bytes, state: bytes, bitmap: bytes | None, other: bytes, file_size: int
) -> None:
    attrs = {xattrs.META: meta, xattrs.STATE: state, xattrs.HITS: other}
    attrs[xattrs.LAST_ACCESSED] = attrs[xattrs.LAST_MODIFIED] = attrs[xattrs.ERROR] = other
    if bitmap is not None:
        attrs[xattrs.BITMAP] = bitmap
    try:
        entry = entries.parse(Path(str(uuid.uuid4())), attrs, stat_of(file_size))
    except ValueError:
        return
    assert entry.size == file_size and entry.chunk_size == chunk_size_for(file_size)
    assert entry.present.count == chunk_count(entry.size, entry.chunk_size) <= MAX_CHUNKS
    assert entry.hits >= 0 and math.isfinite(entry.last_accessed + entry.last_modified)


hexes = st.none() | st.text("0123456789abcdef", min_size=1, max_size=128)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, 2 * TiB),
    checksum=hexes,
    algo=st.none() | st.sampled_from(["sha256", "sha512"]),
    value=hexes,
    chunks=st.sets(st.integers(0, MAX_CHUNKS - 1), max_size=20),
)
def test_create_then_load_round_trip(
    size: int, checksum: str | None, algo: str | None, value: str | None, chunks: set[int]
) -> None:
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        path = Path(tmp) / str(uuid.uuid4())
        made = entries.create(
            path, path.name, size, checksum=checksum, os_hash_algo=algo, os_hash_value=value
        )
        fd = os.open(path, os.O_RDWR)
        try:
            made.present.update(c for c in chunks if c < made.chunk_count)
            entries.record_present(fd, made.present.to_bytes(), made.last_modified)
        finally:
            os.close(fd)
        loaded = entries.load(path)
    assert loaded.state is State.FILLING
    for name in ("size", "chunk_size", "checksum", "os_hash_algo", "os_hash_value"):
        assert getattr(loaded, name) == getattr(made, name)
    assert list(loaded.present) == list(made.present)
    assert loaded.last_modified == made.last_modified


# ------------------------------------------------------------------------ bitmap
@FUZZ
@given(st.integers(-3, MAX_CHUNKS + 3), st.binary(max_size=1100))
def test_bitmap_decode_raises_only_value_error(count: int, raw: bytes) -> None:
    try:
        bitmap = Bitmap.decode(count, raw)
    except ValueError:
        return
    assert bitmap.to_bytes() == raw and all(0 <= i < count for i in bitmap)


@FUZZ
@given(st.data())
def test_bitmap_round_trip(data: st.DataObject) -> None:
    count = data.draw(st.integers(1, MAX_CHUNKS))
    chunks = data.draw(st.sets(st.integers(0, count - 1), max_size=50))
    bitmap = Bitmap(count)
    bitmap.update(chunks)
    again = Bitmap.decode(count, bitmap.to_bytes())
    assert set(again) == chunks and len(again) == len(chunks)
    assert again.full() == (len(chunks) == count)


# ------------------------------------------------------------------------ commit record
@FUZZ
@given(jsonish)
def test_identity_decode_raises_only_value_error(raw: bytes) -> None:
    try:
        Identity.decode(raw)
    except ValueError:
        pass


@FUZZ
@given(
    st.builds(
        Identity,
        st.integers(0, 1 << 62),
        st.integers(-(1 << 62), 1 << 62),
        st.integers(-(1 << 62), 1 << 62),
        st.integers(0, (1 << 64) - 1),
        st.integers(0, (1 << 64) - 1),
    )
)
def test_identity_round_trip(identity: Identity) -> None:
    assert Identity.decode(identity.encode()) == identity


# ------------------------------------------------------------------------ prefetch status
@FUZZ
@given(
    st.one_of(
        jsonish,
        st.fixed_dictionaries(
            {},
            optional={
                "failures": json_scalars,
                "last_error": json_scalars,
                "last_attempt": json_scalars,
                "next_attempt": json_scalars,
            },
        ).map(lambda d: json.dumps(d).encode()),
    )
)
def test_parse_status_raises_only_value_error(raw: bytes) -> None:
    try:
        status = parse_status(raw)
    except ValueError:
        return
    assert status.failures >= 0 and math.isfinite(status.next_attempt)


finite = st.floats(allow_nan=False, allow_infinity=False, min_value=0, max_value=1e12)


@settings(max_examples=100, deadline=None)
@given(
    st.builds(
        QueueStatus,
        st.integers(0, 1000),
        st.none() | st.text(max_size=300),
        st.none() | finite,
        finite,
    )
)
def test_prefetch_status_round_trip(status: QueueStatus) -> None:
    assert parse_status(codec.dumps(asdict(status))) == status
    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / str(uuid.uuid4())
        marker.touch()
        write_status(marker, status)
        assert read_status(marker) == QueueStatus(
            status.failures, status.last_error or None, status.last_attempt, status.next_attempt
        )
