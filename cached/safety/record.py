"""The ``user.cached.verdict`` extended attribute: an entry's content verdict, at most 256
bytes, beside the presence bitmap in ext4's one 4 KiB xattr block.

The value is compact JSON (the encoding of :mod:`cached.store.codec`)::

    {"v":1,"verdict":"unsafe","detected":"qcow2","declared":"raw","checks":["backing_file"],
     "ignored":[],"vsize":67108864,"oslo":"10.2.0","policy":"1f0c9a2e","container":"bare"}

``oslo`` and ``policy`` (:meth:`~cached.safety.verdict.Policy.fingerprint`: the allowed formats
and non-fatal checks) say what judged it: a verdict of another oslo.utils version or policy is
not current, and the image is inspected again (:mod:`cached.safety.audit`). ``container``
(the declared container_format) came later: a record without it still parses (its container
is then unknown: None, or ``"?"`` for a ``not-inspectable`` verdict on a format that is
inspectable, which only a non-bare container explains), so the declaration a re-inspection
judges against is the one the fill saw.

Parsing is strict, as for every xattr (someone else may have written it): unknown keys,
missing keys, wrong types, names outside ``[a-z0-9_+,.-]`` and values over their bounds are
refused with :class:`ValueError`, which callers treat as "no verdict": the image is
inspected again. The error's text is not stored (it is logged when it happens).

Pure functions, no shared state: any thread may call them.
"""

from __future__ import annotations

import re
from typing import Any

from cached.safety.verdict import NAME as _NAME
from cached.safety.verdict import NOT_INSPECTABLE, Outcome, Verdict
from cached.store import codec

NAME = "user.cached.verdict"
MAX_LEN = 256
VERSION = 1
MAX_CHECKS = 8
MAX_SIZE = 1 << 63

_KEYS = frozenset(
    ["v", "verdict", "detected", "declared", "checks", "ignored", "vsize", "oslo", "policy"]
)
_OPTIONAL = frozenset(["container"])  # absent from records written before it existed
_VERSION = re.compile(r"[0-9A-Za-z.+-]{1,24}")
_POLICY = re.compile(r"[0-9a-f]{8}")
_MORE = "+more"  # stands for checks dropped to fit MAX_LEN


def dumps(verdict: Verdict) -> bytes:
    """Encode ``verdict`` in at most 256 bytes.

    Check names beyond what fits are replaced by one ``"+more"``; a declared format that is
    not a plain name is stored as ``"?"`` (it came from upstream JSON).

    Raises:
        ValueError: a field that no verdict of :func:`~cached.safety.verdict.judge` has
            (a detected name or version outside the allowed characters).
    """
    declared, container = verdict.declared, verdict.container
    if declared is not None and not _NAME.fullmatch(declared):
        declared = "?"
    if container is not None and not _NAME.fullmatch(container):
        container = "?"
    checks = list(verdict.checks[:MAX_CHECKS])
    ignored = list(verdict.ignored[:MAX_CHECKS])
    while True:
        doc: dict[str, Any] = {
            "v": VERSION,
            "verdict": verdict.outcome.value,
            "detected": verdict.detected,
            "declared": declared,
            "checks": checks,
            "ignored": ignored,
            "vsize": verdict.virtual_size,
            "oslo": verdict.version,
            "policy": verdict.policy,
            "container": container,
        }
        raw = codec.dumps(doc)
        if len(raw) <= MAX_LEN:
            break
        if ignored:
            ignored = ignored[:-2] + [_MORE] if len(ignored) > 1 else []
        elif len(checks) > 1:
            checks = checks[:-2] + [_MORE]
        elif container not in (None, "?"):
            container = "?"  # (long names: never Glance's)
        elif declared not in (None, "?"):
            declared = "?"
        else:
            raise ValueError(f"verdict does not fit {MAX_LEN} bytes: {raw[:80]!r}")
    loads(raw)  # never write what we would refuse to read back
    return raw


def loads(raw: bytes) -> Verdict:
    """Decode a ``user.cached.verdict`` value.

    Raises:
        ValueError: not exactly what :func:`dumps` writes.
    """
    doc = codec.loads_object(raw, max_len=MAX_LEN, max_depth=2)
    unknown = doc.keys() - _KEYS - _OPTIONAL
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    missing = _KEYS - doc.keys()
    if missing:
        raise ValueError(f"missing keys {sorted(missing)}")
    if codec.int_field(doc, "v", low=VERSION, high=VERSION) != VERSION:
        raise ValueError("unknown version")  # pragma: no cover - int_field bounds it
    try:
        outcome = Outcome(doc["verdict"])
    except ValueError:
        raise ValueError(f"verdict: {str(doc['verdict'])[:40]!r} is not a verdict") from None
    vsize = None if doc["vsize"] is None else codec.int_field(doc, "vsize", low=0, high=MAX_SIZE)
    declared = _name(doc, "declared", allow_unknown=True)
    if "container" in doc:
        container = _name(doc, "container", allow_unknown=True)
    elif outcome is Outcome.NOT_INSPECTABLE and declared not in NOT_INSPECTABLE:
        container = "?"  # a record from before "container": only a container explains it
    else:
        container = None
    return Verdict(
        outcome=outcome,
        detected=_name(doc, "detected"),
        declared=declared,
        checks=_names(doc, "checks"),
        ignored=_names(doc, "ignored"),
        virtual_size=vsize,
        version=_matching(doc, "oslo", _VERSION),
        policy=_matching(doc, "policy", _POLICY),
        container=container,
    )


def _name(doc: dict[str, Any], key: str, *, allow_unknown: bool = False) -> str | None:
    value = doc[key]
    if value is None:
        return None
    if allow_unknown and value == "?":
        return value  # type: ignore[no-any-return]
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"{key}: not a format name")
    return value


def _names(doc: dict[str, Any], key: str) -> tuple[str, ...]:
    value = doc[key]
    if not isinstance(value, list) or len(value) > MAX_CHECKS:
        raise ValueError(f"{key}: not a list of at most {MAX_CHECKS} names")
    for item in value:
        if not isinstance(item, str) or not _NAME.fullmatch(item):  # "+more" matches too
            raise ValueError(f"{key}: not a check name")
    return tuple(value)


def _matching(doc: dict[str, Any], key: str, pattern: re.Pattern[str]) -> str:
    value = doc[key]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"{key}: malformed")
    return value
