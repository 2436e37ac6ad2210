"""The verdict on an image's content: what the inspector found, judged against what the
image record declares and the operator's policy (issue 18, "Verdicts").

Pure values and functions, no I/O and no shared state: any thread may call them. The
inspector (:mod:`cached.safety.inspect`) produces an :class:`Observation` on a feeder
thread; :func:`judge` turns it into a :class:`Verdict` wherever the caller likes.

The rules follow what Glance 33 does on upload (``glance/location.py`` ``ImageProxy.set_data``)
where Glance decides, and are stricter where Glance only warns or does not look:

- the inspector failed unexpectedly: ``error``;
- several formats matched, except exactly iso+gpt (a bootable ISO with a GPT in front,
  judged as the ISO, whose checks alone run, as in Glance): ``unsafe``;
- the detected format fails a safety check: ``unsafe``, whatever the container format. A
  check in ``nonfatal_checks`` (Glance's ``gpt_safety_checks_nonfatal``) is ignored for a
  ``gpt`` image only, and ``mbr`` is never fatal when the image is declared ``aki``/``ari``
  (kernels may carry an intentionally invalid MBR), both as in Glance;
- the detected format is outside ``allowed_formats`` (default: all but qed and luks): ``unsafe``;
- raw content (raw, or a bare GPT partition table) declared ``ami``/``aki``/``ari``/``ploop``,
  or in a container other than ``bare``: ``not-inspectable`` (there is nothing to compare);
- declared = detected, or nothing declared: ``safe``;
- declared ``raw`` and raw content: ``safe``; declared ``raw`` and a rich format: ``mismatch``
  (Glance only warns here; the host would open it as the rich format);
- any other declared format and different content: ``mismatch``.

The ``file`` upstream backend declares ``raw``/``bare`` for every file: :func:`declared_by`
turns that into no declaration, so a qcow2 there is judged on its content alone.
"""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass, field

# The format names oslo.utils' inspector reports (format_inspector.ALL_FORMATS, 10.2.0).
INSPECTED_FORMATS = frozenset(
    ["raw", "qcow2", "vhd", "vhdx", "vmdk", "vdi", "qed", "iso", "gpt", "luks"]
)
DEFAULT_ALLOWED = INSPECTED_FORMATS - {"qed", "luks"}
# Glance disk formats the inspector has no inspector for: raw content is all it can see.
NOT_INSPECTABLE = frozenset(["ami", "aki", "ari", "ploop"])
RAW_CONTENT = frozenset(["raw", "gpt"])
KERNEL_FORMATS = frozenset(["aki", "ari"])  # Glance: the MBR check is never fatal for these
NAME = re.compile(r"[a-z0-9_+,.-]{1,48}")  # format and check names as verdicts carry them

# Check names of our own, beside oslo.utils' (backing_file, data_file, descriptor, ...).
CHECK_FORMATS = "formats"  # several formats matched
CHECK_ALLOWED = "allowed_formats"  # the detected format is not allowed
CHECK_UNREADABLE = "unreadable"  # the format matched but its structures could not be read


class Outcome(enum.Enum):
    SAFE = "safe"
    MISMATCH = "mismatch"
    UNSAFE = "unsafe"
    NOT_INSPECTABLE = "not-inspectable"
    ERROR = "error"


@dataclass(frozen=True)
class Finding:
    """One format that matched the content, with what its safety checks said.

    ``failed`` names the checks that failed (oslo.utils' names); ``unreadable`` is set when
    the format matched but could not be safety-checked at all (oslo.utils' ImageFormatError,
    e.g. "Incomplete file cannot be safety checked").
    """

    name: str
    failed: tuple[str, ...] = ()
    unreadable: str | None = None
    virtual_size: int | None = None  # None: the format's header gives none


@dataclass(frozen=True)
class Observation:
    """What the inspector saw in one image: the matching formats (``raw`` alone when no
    specific format matched), or the inspector's unexpected failure in ``error``."""

    findings: tuple[Finding, ...]
    size: int  # bytes in the image
    version: str  # oslo.utils' version
    error: str | None = None


@dataclass(frozen=True)
class Declared:
    """The formats the image record declares; None where it declares nothing usable."""

    disk_format: str | None = None
    container_format: str | None = None


@dataclass(frozen=True)
class Policy:
    allowed_formats: frozenset[str] = DEFAULT_ALLOWED
    nonfatal_checks: frozenset[str] = frozenset()

    def fingerprint(self) -> str:
        """8 hex digits that change when the policy does (stored with each verdict)."""
        text = "|".join(
            [",".join(sorted(self.allowed_formats)), ",".join(sorted(self.nonfatal_checks))]
        )
        return hashlib.sha256(text.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    detected: str | None  # one format name; several joined by "," when several matched
    declared: str | None  # the declared disk_format (None: nothing declared)
    checks: tuple[str, ...] = ()  # the fatal failures behind an "unsafe"
    ignored: tuple[str, ...] = ()  # failed checks the rules made non-fatal
    virtual_size: int | None = None
    version: str = ""  # oslo.utils' version
    policy: str = ""  # Policy.fingerprint() of the policy that judged
    reason: str | None = field(default=None, compare=False)  # the error's text, for logs
    container: str | None = None  # the declared container_format (None: nothing declared)

    @property
    def allowed(self) -> bool:
        """Whether the verdict lets the image be a hit when it is enforced."""
        return self.outcome in (Outcome.SAFE, Outcome.NOT_INSPECTABLE)


def declared_by(disk_format: object, container_format: object, *, file_backend: bool) -> Declared:
    """The declaration of an image record's ``disk_format``/``container_format``.

    The ``file`` backend states ``raw``/``bare`` for every file it serves: no declaration.
    Non-string or empty values count as absent; a value that is not a plain format name
    (Glance's are lower-case words) is kept as ``"?"``: it never reaches a header or log
    line as the upstream wrote it.
    """
    disk, container = _name(disk_format), _name(container_format)
    if file_backend and (disk, container) in (("raw", "bare"), ("raw", None), (None, "bare")):
        return Declared()
    return Declared(disk, container)


def _name(value: object) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return value if NAME.fullmatch(value) else "?"


def judge(seen: Observation, declared: Declared, policy: Policy) -> Verdict:
    """The verdict on ``seen`` for an image declared ``declared`` under ``policy``."""
    disk = declared.disk_format

    def verdict(
        outcome: Outcome,
        detected: str | None,
        checks: set[str] | tuple[str, ...] = (),
        ignored: set[str] | tuple[str, ...] = (),
        virtual_size: int | None = None,
        reason: str | None = None,
    ) -> Verdict:
        return Verdict(
            outcome,
            detected,
            disk,
            tuple(sorted(checks)),
            tuple(sorted(ignored)),
            virtual_size,
            seen.version,
            policy.fingerprint(),
            reason,
            declared.container_format,
        )

    if seen.error is not None or not seen.findings:
        return verdict(Outcome.ERROR, None, reason=seen.error or "no format reported")
    by_name = {f.name: f for f in seen.findings}
    if by_name.keys() == {"iso", "gpt"}:
        primary = by_name["iso"]
    elif len(by_name) > 1:
        return verdict(Outcome.UNSAFE, ",".join(sorted(by_name)), {CHECK_FORMATS})
    else:
        primary = seen.findings[0]

    failed = set(primary.failed)
    ignored: set[str] = set()
    if primary.name == "gpt":
        ignored |= failed & policy.nonfatal_checks
    if disk in KERNEL_FORMATS and "mbr" in failed:
        ignored.add("mbr")
    fatal = failed - ignored
    if primary.unreadable is not None:
        fatal.add(CHECK_UNREADABLE)
    if primary.name not in policy.allowed_formats:
        fatal.add(CHECK_ALLOWED)

    size = seen.size if primary.name in RAW_CONTENT else primary.virtual_size
    name = primary.name
    if fatal:
        return verdict(Outcome.UNSAFE, name, fatal, ignored, size)
    container = declared.container_format
    if name in RAW_CONTENT and (disk in NOT_INSPECTABLE or container not in (None, "bare")):
        return verdict(Outcome.NOT_INSPECTABLE, name, (), ignored, size)
    if disk is None or disk == name or (disk == "raw" and name in RAW_CONTENT):
        return verdict(Outcome.SAFE, name, (), ignored, size)
    return verdict(Outcome.MISMATCH, name, (), ignored, size)
