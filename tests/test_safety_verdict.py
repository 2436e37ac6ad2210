"""The verdict rules of issue 18 (cached.safety.verdict.judge), as a table: what the inspector
saw, what the record declares, the policy -> the verdict. Pure functions: the observations are
written out here; tests/test_safety_inspect.py shows real images producing them."""

from __future__ import annotations

import pytest

from cached.safety.verdict import (
    DEFAULT_ALLOWED,
    Declared,
    Finding,
    Observation,
    Outcome,
    Policy,
    declared_by,
    judge,
)

SIZE = 10 << 20
SAFE, MISMATCH, UNSAFE = Outcome.SAFE, Outcome.MISMATCH, Outcome.UNSAFE
NOT_INSPECTABLE, ERROR = Outcome.NOT_INSPECTABLE, Outcome.ERROR


def seen(*findings: Finding, error: str | None = None) -> Observation:
    return Observation(findings, SIZE, "10.2.0", error)


QCOW2 = Finding("qcow2", virtual_size=1 << 30)
QCOW2_BACKING = Finding("qcow2", ("backing_file",), virtual_size=1 << 30)
RAW = Finding("raw")
GPT = Finding("gpt")
GPT_BAD_MBR = Finding("gpt", ("mbr",))
ISO = Finding("iso", virtual_size=SIZE)
VMDK_FLAT = Finding("vmdk", ("descriptor",))
QED = Finding("qed", ("banned",))
LUKS1 = Finding("luks")
VHDX_CUT = Finding("vhdx", unreadable="Incomplete file cannot be safety checked")

# (what was seen, disk_format, container_format) -> (verdict, detected, fatal checks)
TABLE = [
    # nothing declared (the file backend): content alone
    ((QCOW2,), None, None, (SAFE, "qcow2", ())),
    ((QCOW2_BACKING,), None, None, (UNSAFE, "qcow2", ("backing_file",))),
    ((RAW,), None, None, (SAFE, "raw", ())),
    # declared = detected
    ((QCOW2,), "qcow2", "bare", (SAFE, "qcow2", ())),
    ((QCOW2_BACKING,), "qcow2", "bare", (UNSAFE, "qcow2", ("backing_file",))),
    ((ISO,), "iso", "bare", (SAFE, "iso", ())),
    # a failed check is unsafe whatever the container (Glance does not inspect these)
    ((QCOW2_BACKING,), "qcow2", "ovf", (UNSAFE, "qcow2", ("backing_file",))),
    ((VMDK_FLAT,), "vmdk", "ova", (UNSAFE, "vmdk", ("descriptor",))),
    ((QCOW2,), "qcow2", "docker", (SAFE, "qcow2", ())),
    # declared a rich format, detected another
    ((RAW,), "qcow2", "bare", (MISMATCH, "raw", ())),
    ((QCOW2,), "vmdk", "bare", (MISMATCH, "qcow2", ())),
    ((GPT,), "vhdx", "bare", (MISMATCH, "gpt", ())),
    ((QCOW2,), "iso", "bare", (MISMATCH, "qcow2", ())),
    ((QCOW2_BACKING,), "vmdk", "bare", (UNSAFE, "qcow2", ("backing_file",))),
    # declared raw: raw content is safe, a rich format a mismatch (Glance warns), unsafe if
    # it fails a check (CVE-2024-40767: a "raw" qcow2 with a backing file)
    ((RAW,), "raw", "bare", (SAFE, "raw", ())),
    ((GPT,), "raw", "bare", (SAFE, "gpt", ())),
    ((QCOW2,), "raw", "bare", (MISMATCH, "qcow2", ())),
    ((QCOW2_BACKING,), "raw", "bare", (UNSAFE, "qcow2", ("backing_file",))),
    ((GPT_BAD_MBR,), "raw", "bare", (UNSAFE, "gpt", ("mbr",))),
    # several formats: unsafe, except exactly iso+gpt, judged as the iso (Glance)
    ((GPT, ISO), "iso", "bare", (SAFE, "iso", ())),
    ((GPT_BAD_MBR, ISO), "iso", "bare", (SAFE, "iso", ())),
    ((GPT, ISO), "raw", "bare", (MISMATCH, "iso", ())),
    ((GPT, QCOW2), "qcow2", "bare", (UNSAFE, "gpt,qcow2", ("formats",))),
    ((ISO, QCOW2, GPT), None, None, (UNSAFE, "gpt,iso,qcow2", ("formats",))),
    # outside allowed_formats (default all but qed, luks)
    ((QED,), "qed", "bare", (UNSAFE, "qed", ("allowed_formats", "banned"))),
    ((LUKS1,), None, None, (UNSAFE, "luks", ("allowed_formats",))),
    # not inspectable: ami/aki/ari/ploop or a non-bare container with raw content
    ((RAW,), "ami", "ami", (NOT_INSPECTABLE, "raw", ())),
    ((RAW,), "aki", "aki", (NOT_INSPECTABLE, "raw", ())),
    ((RAW,), "ari", "ari", (NOT_INSPECTABLE, "raw", ())),
    ((RAW,), "ploop", "bare", (NOT_INSPECTABLE, "raw", ())),
    ((RAW,), "vmdk", "ova", (NOT_INSPECTABLE, "raw", ())),  # an OVA is a tar: raw to us
    ((RAW,), "raw", "docker", (NOT_INSPECTABLE, "raw", ())),
    ((QCOW2,), "ami", "ami", (MISMATCH, "qcow2", ())),  # rich content is still judged
    ((QCOW2_BACKING,), "ploop", "bare", (UNSAFE, "qcow2", ("backing_file",))),
    # the MBR check is never fatal for kernels and ramdisks (Glance), fatal for ami
    ((GPT_BAD_MBR,), "aki", "aki", (NOT_INSPECTABLE, "gpt", ())),
    ((GPT_BAD_MBR,), "ari", "ari", (NOT_INSPECTABLE, "gpt", ())),
    ((GPT_BAD_MBR,), "ami", "ami", (UNSAFE, "gpt", ("mbr",))),
    # a format that matched but could not be checked
    ((VHDX_CUT,), "vhdx", "bare", (UNSAFE, "vhdx", ("unreadable",))),
]


@pytest.mark.parametrize(
    ("findings", "disk", "container", "want"),
    TABLE,
    ids=[f"{'+'.join(f.name for f in t[0])}-as-{t[1]}-{t[2]}" for t in TABLE],
)
def test_verdict_table(
    findings: tuple[Finding, ...],
    disk: str | None,
    container: str | None,
    want: tuple[Outcome, str, tuple[str, ...]],
) -> None:
    verdict = judge(seen(*findings), Declared(disk, container), Policy())
    assert (verdict.outcome, verdict.detected, verdict.checks) == want
    assert verdict.declared == disk
    assert verdict.version == "10.2.0" and verdict.policy == Policy().fingerprint()
    assert verdict.allowed is (want[0] in (SAFE, NOT_INSPECTABLE))


def test_inspector_failure_is_error() -> None:
    verdict = judge(seen(error="RuntimeError: boom"), Declared("qcow2", "bare"), Policy())
    assert verdict.outcome is ERROR and verdict.detected is None and verdict.checks == ()
    assert verdict.reason == "RuntimeError: boom" and not verdict.allowed
    assert judge(seen(), Declared(), Policy()).outcome is ERROR  # no format at all


def test_nonfatal_checks_apply_to_gpt_only_as_in_glance() -> None:
    lenient = Policy(nonfatal_checks=frozenset({"mbr", "backing_file"}))
    gpt = judge(seen(GPT_BAD_MBR), Declared("raw", "bare"), lenient)
    assert (gpt.outcome, gpt.checks, gpt.ignored) == (SAFE, (), ("mbr",))
    qcow2 = judge(seen(QCOW2_BACKING), Declared("qcow2", "bare"), lenient)
    assert (qcow2.outcome, qcow2.checks, qcow2.ignored) == (UNSAFE, ("backing_file",), ())


def test_allowed_formats_is_policy() -> None:
    no_vmdk = Policy(allowed_formats=DEFAULT_ALLOWED - {"vmdk"})
    verdict = judge(seen(Finding("vmdk", virtual_size=1)), Declared("vmdk", "bare"), no_vmdk)
    assert (verdict.outcome, verdict.checks) == (UNSAFE, ("allowed_formats",))
    with_qed = Policy(allowed_formats=DEFAULT_ALLOWED | {"qed"})
    assert judge(seen(QED), Declared(), with_qed).checks == ("banned",)  # still banned by oslo
    assert no_vmdk.fingerprint() != Policy().fingerprint() != with_qed.fingerprint()


def test_virtual_size_of_raw_content_is_the_image_size() -> None:
    assert judge(seen(RAW), Declared(), Policy()).virtual_size == SIZE
    assert judge(seen(GPT), Declared(), Policy()).virtual_size == SIZE
    assert judge(seen(QCOW2), Declared("raw", "bare"), Policy()).virtual_size == 1 << 30


@pytest.mark.parametrize(
    ("disk", "container", "file_backend", "want"),
    [
        ("raw", "bare", True, Declared()),  # what FileBackend states for every file
        ("raw", None, True, Declared()),
        (None, "bare", True, Declared()),
        ("qcow2", "bare", True, Declared("qcow2", "bare")),
        ("raw", "bare", False, Declared("raw", "bare")),
        ("", "", False, Declared()),
        (3, ["bare"], False, Declared()),  # not strings: nothing usable declared
        ('qcow2"\r\nX-Injected: 1', "bare", False, Declared("?", "bare")),  # not a name
        ("QCOW2", "BARE", False, Declared("?", "?")),
    ],
)
def test_declared_by(disk: object, container: object, file_backend: bool, want: Declared) -> None:
    assert declared_by(disk, container, file_backend=file_backend) == want


def test_file_backend_qcow2_is_judged_on_content() -> None:
    """The file backend's raw/bare would make every qcow2 a mismatch: it is no declaration."""
    declared = declared_by("raw", "bare", file_backend=True)
    assert judge(seen(QCOW2), declared, Policy()).outcome is SAFE
    assert judge(seen(QCOW2), declared_by("raw", "bare", file_backend=False), Policy()).outcome is (
        MISMATCH
    )
