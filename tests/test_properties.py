"""Property-based tests (hypothesis) for the Range parser and the presence bitmap.

``CACHED_FUZZ_EXAMPLES`` sets the examples per property (default 300; CI runs more).
"""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cached.edge import ranges
from cached.store.chunks import MAX_CHUNKS, MIN_CHUNK, Bitmap, chunk_size_for

EXAMPLES = int(os.environ.get("CACHED_FUZZ_EXAMPLES", "300"))
props = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

sizes = st.one_of(st.integers(0, 10), st.integers(0, 1 << 45))
# Positions (as the digits sent) from small to far beyond any image, some with thousands of
# digits: more than int() converts by default (4,300).
positions = st.one_of(
    st.integers(0, 20).map(str),
    st.integers(0, 1 << 70).map(str),
    st.tuples(st.integers(1, 9), st.integers(21, 6000)).map(lambda t: str(t[0]) * t[1]),
)


def _int(digits: str) -> int:
    """The exact value of ``digits``, however long (for the model only)."""
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        return int(digits)
    finally:
        sys.set_int_max_str_digits(old)


def _model(first: int | None, last: int | None, size: int) -> tuple[int, int] | None | str:
    """RFC 9110 §14.1.1/§14.1.2 by the letter, in Python's unbounded integers."""
    if first is None:
        assert last is not None
        if last == 0:
            return "416"
        if size == 0:
            return None
        return max(0, size - last), size
    if first >= size or (last is not None and last < first):
        return "416"
    return first, size if last is None else min(last + 1, size)


def _outcome(header: str, size: int) -> tuple[int, int] | None | str:
    try:
        got = ranges.parse(header, size)
    except ranges.RangeNotSatisfiable:
        return "416"
    return None if got is None else (got.start, got.end)


@props
@given(first=st.none() | positions, last=st.none() | positions, size=sizes, zeros=st.integers(0, 3))
def test_range_matches_the_rfc(first: str | None, last: str | None, size: int, zeros: int) -> None:
    if first is None and last is None:
        return
    pad = "0" * zeros  # leading zeros change nothing
    spec = f"{'' if first is None else pad + first}-{'' if last is None else pad + last}"
    expected = _model(
        None if first is None else _int(first), None if last is None else _int(last), size
    )
    assert _outcome(f"bytes={spec}", size) == expected


@props
@given(header=st.text(max_size=200), size=sizes)
def test_any_text_gives_a_range_or_a_named_error(header: str, size: int) -> None:
    try:
        got = ranges.parse(header, size)
    except (ranges.RangeNotSatisfiable, ranges.MalformedRange, ranges.MultipleRanges):
        return
    if got is not None:
        assert 0 <= got.start < got.end <= size == got.size
        assert got.content_range() == f"bytes {got.start}-{got.end - 1}/{size}"


@props
@given(
    digits=st.text(
        alphabet=st.characters(categories=["Nd"]).filter(lambda c: not "0" <= c <= "9"),
        min_size=1,
        max_size=5,
    )
)
def test_only_ascii_digits(digits: str) -> None:
    for header in (f"bytes={digits}-", f"bytes=-{digits}", f"bytes=0-{digits}"):
        with pytest.raises(ranges.MalformedRange):
            ranges.parse(header, 100)


def test_thousands_of_digits() -> None:
    many = "9" * 5000
    with pytest.raises(ranges.RangeNotSatisfiable):
        ranges.parse(f"bytes={many}-", 100)
    assert ranges.parse(f"bytes=0-{many}", 100) == ranges.ByteRange(0, 100, 100)
    assert ranges.parse(f"bytes=-{many}", 100) == ranges.ByteRange(0, 100, 100)
    assert ranges.parse(f"bytes={'0' * 5000}7-", 100) == ranges.ByteRange(7, 100, 100)


def test_empty_image() -> None:
    # RFC 9110 §14.1.1: a non-zero suffix is the only satisfiable range of an empty image.
    assert ranges.parse("bytes=-5", 0) is None
    for header in ("bytes=0-", "bytes=0-0", "bytes=-0"):
        with pytest.raises(ranges.RangeNotSatisfiable):
            ranges.parse(header, 0)


@props
@given(data=st.data(), count=st.integers(0, MAX_CHUNKS))
def test_bitmap_is_a_set(data: st.DataObject, count: int) -> None:
    members = data.draw(st.sets(st.integers(0, max(count - 1, 0)))) if count else set()
    bitmap = Bitmap(count)
    bitmap.update(members)
    assert list(bitmap) == sorted(members)
    assert len(bitmap) == len(members)
    assert bitmap.full() == (len(members) == count)
    probe = data.draw(st.integers(-5, count + 5))
    assert (probe in bitmap) == (probe in members)
    raw = bitmap.to_bytes()
    assert len(raw) == (count + 7) // 8
    again = Bitmap(count, raw)
    assert list(again) == sorted(members) and again.to_bytes() == raw
    copy = bitmap.copy()
    if count:
        copy.add(count - 1)
        assert (count - 1 in bitmap) == (count - 1 in members)  # the copy is independent
    with pytest.raises(IndexError):
        bitmap.add(count)
    with pytest.raises(IndexError):
        bitmap.add(-1)


@props
@given(count=st.integers(0, MAX_CHUNKS), raw=st.binary(max_size=MAX_CHUNKS // 8 + 2))
def test_bitmap_refuses_a_wrong_length(count: int, raw: bytes) -> None:
    if len(raw) == (count + 7) // 8:
        bitmap = Bitmap(count, raw)
        assert all(0 <= i < count for i in bitmap)
        return
    with pytest.raises(ValueError):
        Bitmap(count, raw)


@props
@given(size=st.integers(0, 1 << 50))
def test_chunk_size(size: int) -> None:
    chunk = chunk_size_for(size)
    assert chunk >= MIN_CHUNK and chunk % MIN_CHUNK == 0 and (chunk & (chunk - 1)) == 0
    assert -(-size // chunk) <= MAX_CHUNKS
    if chunk > MIN_CHUNK:  # the smallest that fits
        assert -(-size // (chunk // 2)) > MAX_CHUNKS
