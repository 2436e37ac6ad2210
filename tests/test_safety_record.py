"""The ``user.cached.verdict`` codec (cached.safety.record): what we write reads back as
written within 256 bytes, anything else raises only ValueError (the caller inspects again),
and the value survives a real xattr on a real file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cached.safety import record
from cached.safety.verdict import INSPECTED_FORMATS, Outcome, Verdict
from cached.store import xattrs

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

GOOD = Verdict(
    Outcome.UNSAFE,
    "qcow2",
    "raw",
    ("backing_file",),
    (),
    64 << 20,
    "10.2.0",
    "1f0c9a2e",
    container="bare",
)
GOOD_RAW = (
    b'{"v":1,"verdict":"unsafe","detected":"qcow2","declared":"raw","checks":["backing_file"],'
    b'"ignored":[],"vsize":67108864,"oslo":"10.2.0","policy":"1f0c9a2e","container":"bare"}'
)
# Written before "container" existed: still a verdict (its container unknown).
OLD_RAW = (
    b'{"v":1,"verdict":"unsafe","detected":"qcow2","declared":"raw","checks":["backing_file"],'
    b'"ignored":[],"vsize":67108864,"oslo":"10.2.0","policy":"1f0c9a2e"}'
)

names = st.sampled_from(
    sorted(INSPECTED_FORMATS)
    + ["backing_file", "data_file", "unknown_features", "descriptor", "footer", "mbr"]
    + ["banned", "version", "passphrase", "inner_safety", "inner_version", "formats"]
    + ["allowed_formats", "unreadable"]
)
verdicts = st.builds(
    Verdict,
    outcome=st.sampled_from(Outcome),
    detected=st.none() | names | st.lists(names, min_size=2, max_size=10).map(",".join),
    declared=st.none() | names | st.text(max_size=80),
    checks=st.lists(names, max_size=12).map(tuple),
    ignored=st.lists(names, max_size=12).map(tuple),
    virtual_size=st.none() | st.integers(0, 1 << 63),
    version=st.from_regex(r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}", fullmatch=True),
    policy=st.from_regex(r"[0-9a-f]{8}", fullmatch=True),
    container=st.none() | st.sampled_from(["bare", "ovf", "ova", "docker"]) | st.text(max_size=60),
)


def test_the_documented_encoding() -> None:
    assert record.dumps(GOOD) == GOOD_RAW
    assert record.loads(GOOD_RAW) == GOOD


def test_a_record_from_before_the_container_still_parses() -> None:
    assert record.loads(OLD_RAW) == dataclasses.replace(GOOD, container=None)
    # not-inspectable with an inspectable disk format: only a non-bare container explains it
    old = OLD_RAW.replace(b'"unsafe"', b'"not-inspectable"')
    assert record.loads(old).container == "?"


@FUZZ
@given(verdicts)
def test_every_verdict_fits_and_reads_back(verdict: Verdict) -> None:
    try:
        raw = record.dumps(verdict)
    except ValueError:  # only a detected list too long to fit even without checks
        assert verdict.detected is not None and len(verdict.detected) > 48
        return
    assert len(raw) <= record.MAX_LEN
    back = record.loads(raw)
    assert (back.outcome, back.detected, back.virtual_size) == (
        verdict.outcome,
        verdict.detected,
        verdict.virtual_size,
    )
    assert back.version == verdict.version and back.policy == verdict.policy
    kept = [c for c in back.checks if c != "+more"]
    assert kept == list(verdict.checks[: len(kept)])
    if back.checks == verdict.checks[: record.MAX_CHECKS]:
        assert back.ignored == verdict.ignored[: len(back.ignored)] or "+more" in back.ignored
    if verdict.declared is None or record._NAME.fullmatch(verdict.declared):
        # (a name too long to fit beside everything else is stored as "?")
        assert back.declared in (verdict.declared, "?")
    else:
        assert back.declared == "?"


@FUZZ
@given(st.binary(max_size=400) | verdicts.map(lambda v: _mutated(v)))
def test_anything_else_raises_only_value_error(raw: bytes) -> None:
    try:
        verdict = record.loads(raw)
    except ValueError:
        return
    assert record.dumps(verdict) == raw  # accepted: exactly what we would have written


def _mutated(verdict: Verdict) -> bytes:
    """A valid encoding with one key's value swapped for a plausible wrong one."""
    try:
        doc = json.loads(record.dumps(verdict))
    except ValueError:
        return b""
    for key in sorted(doc):
        doc[key] = {"v": 2}.get(key, True)
        break
    return json.dumps(doc, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{}",
        b"[]",
        GOOD_RAW.replace(b'"v":1', b'"v":2'),
        GOOD_RAW.replace(b'"unsafe"', b'"fine"'),
        GOOD_RAW.replace(b'"qcow2"', b'"QCOW2"'),
        GOOD_RAW.replace(b'"qcow2"', b'"../etc"'),
        GOOD_RAW.replace(b'"backing_file"', b"1"),
        GOOD_RAW.replace(b'["backing_file"]', b'"backing_file"'),
        GOOD_RAW.replace(b"67108864", b"-1"),
        GOOD_RAW.replace(b"67108864", b"true"),
        GOOD_RAW.replace(b"67108864", b"1.5"),
        GOOD_RAW.replace(b"67108864", b"1e400"),
        GOOD_RAW.replace(b'"1f0c9a2e"', b'"1F0C9A2E"'),
        GOOD_RAW.replace(b'"10.2.0"', b'"10.2.0 ; rm"'),
        GOOD_RAW.replace(b',"ignored":[]', b""),  # a key missing
        GOOD_RAW.replace(b"}", b',"extra":1}'),  # an unknown key
        GOOD_RAW.replace(b'["backing_file"]', b'["a","b","c","d","e","f","g","h","i"]'),
        GOOD_RAW.replace(b'["backing_file"]', b"[[[1]]]"),
        GOOD_RAW[:-1],
        GOOD_RAW + b" " * (record.MAX_LEN - len(GOOD_RAW) + 1),  # over 256 bytes
        GOOD_RAW.replace(b"qcow2", "qcöw2".encode("latin-1")),  # not UTF-8
    ],
)
def test_strict_parsing(raw: bytes) -> None:
    with pytest.raises(ValueError):
        record.loads(raw)


def test_worst_case_checks_are_trimmed_to_fit() -> None:
    many = tuple(f"inner_unknown_features_{i}" for i in range(8))
    verdict = Verdict(
        Outcome.UNSAFE, "gpt,iso,luks,qcow2,qed", "raw", many, many, 1 << 62, "10.2.0", "0" * 8
    )
    raw = record.dumps(verdict)
    assert len(raw) <= record.MAX_LEN
    back = record.loads(raw)
    assert back.checks[-1] == "+more" and back.checks[0] == many[0]


def test_on_a_real_file(tmp_path: Path) -> None:
    path = tmp_path / "entry"
    path.write_bytes(b"x")
    xattrs.write(path, record.NAME, record.dumps(GOOD))
    assert record.loads(xattrs.read_all(path)[record.NAME]) == GOOD
