"""The format inspector as a stream consumer (cached.safety.inspect), on real images.

The images are made here by ``qemu-img`` (and ``xorriso`` for an ISO) or written byte by byte
where no tool makes them (a 119-byte qcow2, LUKS headers, a protective MBR, a VMDK footer).
Each is fed in 4 KiB, 64 KiB, 1 MiB and 4 MiB pieces and in random cuts, and must give one
verdict however it is cut. Without the tools the image tests skip, unless
``$CACHED_TOOLS_REQUIRED`` (set by CI) says they must run. A hypothesis property feeds
crafted bytes (format magics, odd header fields) whole and in random cuts: the same
observation, never an exception (``$CACHED_FUZZ_EXAMPLES`` / 3 examples).
"""

from __future__ import annotations

import io
import os
import random
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oslo_utils.imageutils import format_inspector

from cached.safety import inspect
from cached.safety.inspect import Inspector, Phase
from cached.safety.verdict import Declared, Outcome, Policy, Verdict, judge

KiB, MiB = 1 << 10, 1 << 20
PIECES = [4 * KiB, 64 * KiB, MiB, 4 * MiB]
VHD_64M = 67125248  # qemu-img rounds a VHD up to whole CHS cylinders


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CACHED_TOOLS_REQUIRED"):
            pytest.fail(f"{tool} is required here ($CACHED_TOOLS_REQUIRED) but not installed")
        pytest.skip(f"{tool} not installed (apt-get install qemu-utils xorriso)")
    return path


def qemu_img(*args: str | Path) -> None:
    subprocess.run([require("qemu-img"), *map(str, args)], check=True, capture_output=True)


def cuts(size: int, how: int | tuple[int, int], seed: int = 0) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces covering ``size`` bytes: fixed or random lengths."""
    rng = random.Random(seed)
    pos = 0
    while pos < size:
        n = how if isinstance(how, int) else rng.randint(*how)
        yield pos, min(n, size - pos)
        pos += n


def inspect_bytes(data: bytes, how: int | tuple[int, int], seed: int = 0) -> Inspector:
    inspector = Inspector()
    view = memoryview(data)
    for offset, length in cuts(len(data), how, seed):
        inspector.feed(offset, view[offset : offset + length])
    inspector.finish(len(data))
    return inspector


def verdict_of(data: bytes, how: int | tuple[int, int] = 64 * KiB, **declared: str) -> Verdict:
    seen = inspect_bytes(data, how).finish(len(data))
    return judge(seen, Declared(**declared), Policy())


def every_cut(data: bytes, **declared: str) -> set[tuple[object, ...]]:
    """The distinct verdicts over fixed pieces and 20 random cuttings (<= 1 MiB, <= 64 KiB)."""
    hows: list[int | tuple[int, int]] = [*PIECES, *[(1, MiB)] * 10, *[(1, 64 * KiB)] * 10]
    seen = set()
    for seed, how in enumerate(hows):
        v = judge(inspect_bytes(data, how, seed).finish(len(data)), Declared(**declared), Policy())
        seen.add((v.outcome, v.detected, v.checks, v.virtual_size))
    return seen


# --------------------------------------------------------------------------- the images
def _tiny_qcow2() -> bytes:
    """A qcow2 v2 header and its backing file name: 119 bytes that ``qemu-img info`` opens."""
    name = b"/var/lib/nova/instances/_base/0123456789abcdef0"  # 47 bytes
    header = struct.pack(
        ">4sIQIIQIIQQIIQ", b"QFI\xfb", 2, 72, len(name), 16, 64 * MiB, 0, 1, 1 << 16, 2 << 16, 1,
        0, 0,
    )  # fmt: skip
    return header + name


def _luks(version: int) -> bytes:
    header = struct.pack(
        ">6sH32s32s32sII20s32sI", b"LUKS\xba\xbe", version, b"aes", b"xts-plain64", b"sha256",
        4096, 64, bytes(20), bytes(32), 1000,
    )  # fmt: skip
    return header.ljust(MiB, b"\0")


def _protective_mbr(image: bytearray, *, extra: bool = False) -> bytearray:
    sectors = len(image) // 512 - 1
    image[446:462] = struct.pack("<B3BB3BII", 0, 0, 2, 0, 0xEE, 255, 255, 255, 1, sectors)
    if extra:  # a second partition beside the protective one: the MBR check fails
        image[462:478] = struct.pack("<B3BB3BII", 0, 0, 2, 0, 0x83, 255, 255, 255, 2048, 100)
    image[510:512] = b"\x55\xaa"
    return image


def _vmdk_with_footer(stream: bytes, *, good: bool) -> bytes:
    """A streamOptimized VMDK whose header says "grain directory in the footer" (gdOffset all
    ones), with a footer marker, footer and end-of-stream marker appended (good) or a footer
    marker only (bad)."""
    header = bytearray(stream[:512])
    footer = bytes(header)
    header[56:64] = b"\xff" * 8
    marker = struct.pack("<QII", 1, 0, 3).ljust(512, b"\0")
    eos = bytes(512)
    body = bytes(header) + stream[512:]
    return body + marker + (footer + eos if good else bytes(1024) + marker)


def _vmdk_big_descriptor() -> bytes:
    """A sparse VMDK header naming a 1 MiB descriptor at sector 1, full of non-ASCII bytes."""
    header = struct.pack("<4sIIQQQQIQQ", b"KDMV", 1, 3, 2048, 128, 1, 2048, 512, 0, 0)
    descriptor = ("é" * (MiB // 2)).encode()[: 2048 * 512]
    return header.ljust(512, b"\0") + descriptor + bytes(64 * KiB)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], bytes]:
    """Image name -> its bytes, made on first use in a module-wide directory."""
    where = tmp_path_factory.mktemp("images")
    made: dict[str, bytes] = {}

    def make(name: str) -> Path:
        out = where / name
        size = "64M"
        if name == "clean.qcow2":
            qemu_img("create", "-q", "-f", "qcow2", out, size)
        elif name in ("clean.vmdk", "clean.vdi", "clean.vhdx", "clean.qed"):
            qemu_img("create", "-q", "-f", name.split(".")[1], out, size)
        elif name == "v1.qcow":
            qemu_img("create", "-q", "-f", "qcow", out, size)
        elif name == "unknown-bit.qcow2":
            qemu_img("create", "-q", "-f", "qcow2", out, size)
            data = bytearray(out.read_bytes())
            data[72 + 6] |= 0x04  # incompatible feature bit 10: unknown to qemu and oslo
            out.write_bytes(data)
        elif name == "clean.vhd":
            qemu_img("create", "-q", "-f", "vpc", out, size)
        elif name == "backing.qcow2":
            qemu_img("create", "-q", "-f", "raw", where / "base.raw", "1M")
            qemu_img("create", "-q", "-f", "qcow2", "-b", where / "base.raw", "-F", "raw", out)
        elif name == "datafile.qcow2":
            qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={where}/data.bin", out, size)
        elif name == "passwd.vmdk":
            qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", out, "1M")
            text = out.read_text().replace('"passwd-flat.vmdk"', '"/etc/passwd"')
            assert '"/etc/passwd"' in text
            out.write_text(text)
        elif name == "stream.vmdk":
            (where / "noise.raw").write_bytes(random.Random(7).randbytes(300 * KiB))
            qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
                     where / "noise.raw", out)  # fmt: skip
        elif name == "plain.raw":
            out.write_bytes(random.Random(8).randbytes(3 * MiB))
        elif name == "plain.iso":
            tree = where / "iso"
            tree.mkdir(exist_ok=True)
            (tree / "hello.txt").write_text("hello\n")
            subprocess.run([require("xorriso"), "-as", "mkisofs", "-quiet", "-o", str(out),
                            str(tree)], check=True, capture_output=True)  # fmt: skip
        else:
            raise AssertionError(name)
        return out

    def get(name: str) -> bytes:
        if name not in made:
            made[name] = make(name).read_bytes()
        return made[name]

    return get


# name, detected, verdict, failed checks, virtual size (nothing declared, default policy)
MADE = [
    ("clean.qcow2", "qcow2", Outcome.SAFE, (), 64 * MiB),
    ("clean.vmdk", "vmdk", Outcome.SAFE, (), 64 * MiB),
    ("clean.vhd", "vhd", Outcome.SAFE, (), VHD_64M),
    ("clean.vhdx", "vhdx", Outcome.SAFE, (), 64 * MiB),
    ("clean.vdi", "vdi", Outcome.SAFE, (), 64 * MiB),
    ("stream.vmdk", "vmdk", Outcome.SAFE, (), 300 * KiB),
    ("plain.raw", "raw", Outcome.SAFE, (), None),
    ("plain.iso", "iso", Outcome.SAFE, (), None),
    ("backing.qcow2", "qcow2", Outcome.UNSAFE, ("backing_file",), MiB),
    ("datafile.qcow2", "qcow2", Outcome.UNSAFE, ("data_file",), 64 * MiB),
    ("passwd.vmdk", "vmdk", Outcome.UNSAFE, ("descriptor",), None),  # flat: no size
    ("clean.qed", "qed", Outcome.UNSAFE, ("allowed_formats", "banned"), None),
    ("v1.qcow", "qcow2", Outcome.UNSAFE, ("unknown_features",), 64 * MiB),
    ("unknown-bit.qcow2", "qcow2", Outcome.UNSAFE, ("unknown_features",), 64 * MiB),
]


@pytest.mark.parametrize(
    ("name", "detected", "outcome", "checks", "virtual_size"), MADE, ids=[m[0] for m in MADE]
)
def test_tool_made_image_one_verdict_however_cut(
    images: Callable[[str], bytes],
    name: str,
    detected: str,
    outcome: Outcome,
    checks: tuple[str, ...],
    virtual_size: int | None,
) -> None:
    data = images(name)
    verdicts = every_cut(data)
    assert len(verdicts) == 1, verdicts
    ((got_outcome, got_detected, got_checks, vsize),) = verdicts
    assert (got_outcome, got_detected, got_checks) == (outcome, detected, checks)
    assert vsize == (len(data) if detected in ("raw", "iso") else virtual_size)


CRAFTED: list[tuple[str, Callable[[], bytes], str, Outcome, tuple[str, ...]]] = [
    ("qcow2-119-bytes-backing-file", _tiny_qcow2, "qcow2", Outcome.UNSAFE, ("backing_file",)),
    ("luks1-without-key", lambda: _luks(1), "luks", Outcome.UNSAFE, ("allowed_formats",)),
    ("luks2", lambda: _luks(2), "luks", Outcome.UNSAFE, ("allowed_formats", "version")),
    ("gpt", lambda: bytes(_protective_mbr(bytearray(MiB))), "gpt", Outcome.SAFE, ()),
    (
        "gpt-bad-mbr",
        lambda: bytes(_protective_mbr(bytearray(MiB), extra=True)),
        "gpt",
        Outcome.UNSAFE,
        ("mbr",),
    ),  # fmt: skip
    (
        "vmdk-1MiB-non-ascii-descriptor",
        _vmdk_big_descriptor,
        "vmdk",
        Outcome.UNSAFE,
        ("descriptor",),
    ),  # fmt: skip
    ("empty", lambda: b"", "raw", Outcome.SAFE, ()),
    ("one-byte", lambda: b"\x01", "raw", Outcome.SAFE, ()),
]


@pytest.mark.parametrize(
    ("make", "detected", "outcome", "checks"),
    [c[1:] for c in CRAFTED],
    ids=[c[0] for c in CRAFTED],
)
def test_crafted_image_one_verdict_however_cut(
    make: Callable[[], bytes], detected: str, outcome: Outcome, checks: tuple[str, ...]
) -> None:
    verdicts = every_cut(make())
    assert len(verdicts) == 1, verdicts
    ((got_outcome, got_detected, got_checks, _),) = verdicts
    assert (got_outcome, got_detected, got_checks) == (outcome, detected, checks)


# ---------------------------------------------------------------------- beyond the table
def test_hybrid_iso_with_gpt_is_judged_as_the_iso(images: Callable[[str], bytes]) -> None:
    hybrid = bytes(_protective_mbr(bytearray(images("plain.iso"))))
    seen = inspect_bytes(hybrid, 64 * KiB).finish(len(hybrid))
    assert sorted(f.name for f in seen.findings) == ["gpt", "iso"]
    assert every_cut(hybrid, disk_format="iso") == {(Outcome.SAFE, "iso", (), len(hybrid))}


def test_119_byte_qcow2_is_what_qemu_img_opens(tmp_path: Path) -> None:
    """The hazard is real: qemu-img opens the 119 bytes as a qcow2 with a backing file (the
    inspector, unpadded, would call them raw)."""
    path = tmp_path / "tiny.qcow2"
    path.write_bytes(_tiny_qcow2())
    assert path.stat().st_size == 119
    info = subprocess.run(
        [require("qemu-img"), "info", "--output=json", str(path)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert '"format": "qcow2"' in info and '"backing-filename"' in info
    assert verdict_of(_tiny_qcow2(), 4 * KiB).checks == ("backing_file",)
    unpadded = format_inspector.InspectWrapper(io.BytesIO(_tiny_qcow2()))
    unpadded.read(119)
    unpadded.close()
    assert [str(f) for f in unpadded.formats or []] == ["raw"]  # why the inspector pads


@pytest.mark.parametrize("good", [True, False], ids=["footer-good", "footer-bad"])
def test_vmdk_footer_is_read_from_the_end_of_the_stream(
    images: Callable[[str], bytes], good: bool, tmp_path: Path
) -> None:
    data = _vmdk_with_footer(images("stream.vmdk"), good=good)
    want = (Outcome.SAFE, ()) if good else (Outcome.UNSAFE, ("footer",))
    verdicts = every_cut(data)
    assert {(v[0], v[2]) for v in verdicts} == {want}
    inspector = Inspector()
    inspector.feed(0, data[: 256 * KiB])
    assert inspector.phase is Phase.TAIL  # decided but for the footer
    inspector.feed(256 * KiB, data[256 * KiB :])
    seen = inspector.finish(len(data))
    assert inspector.decided_at == len(data)
    assert judge(seen, Declared(), Policy()).outcome is want[0]
    # A resumed fill: the rest comes from the file, of which only the end is read.
    path = tmp_path / "entry"
    path.write_bytes(data)
    inspector = Inspector()
    inspector.feed(0, data[: 256 * KiB])
    fd = os.open(path, os.O_RDONLY)
    try:
        seen = inspector.catch_up(fd, len(data))
    finally:
        os.close(fd)
    assert (judge(seen, Declared(), Policy()).outcome, seen.size) == (want[0], len(data))


def test_stops_reading_once_decided(images: Callable[[str], bytes]) -> None:
    data = images("clean.vhdx")  # 8 MiB; qemu-img puts its metadata region at 3 MiB
    needed = set()
    for piece in (64 * KiB, MiB, 4 * MiB):
        inspector = Inspector()
        for offset, length in cuts(len(data), piece):
            inspector.feed(offset, data[offset : offset + length])
        assert inspector.decided and inspector.decided_at is not None
        needed.add(inspector.decided_at)
    assert len(needed) == 1  # the blocks it needed, not the pieces they came in
    assert needed.pop() <= 4 * MiB < len(data)
    raw = images("plain.raw")
    inspector = Inspector()
    for offset, length in cuts(len(raw), 4 * KiB):
        inspector.feed(offset, raw[offset : offset + length])
    assert inspector.decided_at == 256 * KiB  # the VHDX header region is the last wanted


def test_out_of_order_bytes_are_caught_up_from_the_file(
    images: Callable[[str], bytes], tmp_path: Path
) -> None:
    data = images("backing.qcow2")
    path = tmp_path / "entry"
    path.write_bytes(data)
    inspector = Inspector()
    inspector.feed(64 * KiB, data[64 * KiB : 128 * KiB])  # a ranged fill: not at position
    assert inspector.position == 0
    fd = os.open(path, os.O_RDONLY)
    try:
        seen = inspector.catch_up(fd, len(data))
    finally:
        os.close(fd)
    assert judge(seen, Declared(), Policy()).checks == ("backing_file",)


def test_an_unreadable_file_gives_an_error_verdict_not_an_exception(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: pread fails with EISDIR
    try:
        seen = Inspector().catch_up(fd, MiB)
    finally:
        os.close(fd)
    verdict = judge(seen, Declared(disk_format="qcow2"), Policy())
    assert verdict.outcome is Outcome.ERROR and verdict.detected is None
    assert verdict.reason is not None and "IsADirectoryError" in verdict.reason


@pytest.mark.parametrize(
    ("name", "cut"),
    [("clean.vhdx", MiB), ("clean.vhdx", 300_000), ("clean.vmdk", 1024), ("stream.vmdk", 10_000)],
)
def test_truncated_image_is_unsafe_unreadable(
    images: Callable[[str], bytes], name: str, cut: int
) -> None:
    data = images(name)[:cut]
    assert every_cut(data) == {(Outcome.UNSAFE, name.split(".")[1], ("unreadable",), None)}


def test_truncated_qcow2_header_is_read_zero_padded(images: Callable[[str], bytes]) -> None:
    """40 bytes of a clean qcow2: zero-padded, the header states no backing file, data file
    or unknown feature; qemu-img itself refuses such a file."""
    assert every_cut(images("clean.qcow2")[:40]) == {(Outcome.SAFE, "qcow2", (), 64 * MiB)}


def test_the_caller_reusing_its_buffer_after_feed_changes_nothing(
    images: Callable[[str], bytes],
) -> None:
    data = images("datafile.qcow2")
    inspector = Inspector()
    buffer = bytearray(3000)  # pieces not aligned to 64 KiB: some bytes wait in the inspector
    for offset, length in cuts(len(data), 3000):
        buffer[:length] = data[offset : offset + length]
        inspector.feed(offset, memoryview(buffer)[:length])
        buffer[:length] = bytes(length)
    assert judge(inspector.finish(len(data)), Declared(), Policy()).checks == ("data_file",)


def test_the_library_version_is_in_every_verdict() -> None:
    assert verdict_of(b"x" * 10).version == inspect.VERSION
    assert inspect.VERSION.split(".")[0].isdigit() and int(inspect.VERSION.split(".")[0]) >= 10


# ------------------------------------------------------------------------- properties
MAGICS = [b"QFI\xfb", b"KDMV", b"vhdxfile", b"conectix", b"LUKS\xba\xbe", b"QED\0", b"# Disk "]
EXAMPLES = int(os.environ.get("CACHED_FUZZ_EXAMPLES", "300")) // 3 or 1


@st.composite
def crafted(draw: st.DrawFn) -> bytes:
    """Bytes that start like an image format more often than random bytes do."""
    head = draw(st.sampled_from([b"", *MAGICS]))
    body = draw(st.binary(max_size=2048))
    size = draw(st.sampled_from([0, 100, 4 * KiB, 70 * KiB, 300 * KiB]))
    data = bytearray((head + body).ljust(size, b"\0"))
    for _ in range(draw(st.integers(0, 8))):  # a few header fields set to odd values
        at = draw(st.integers(0, max(0, len(data) - 8)))
        data[at : at + 8] = draw(st.binary(min_size=8, max_size=8))[: len(data) - at]
    return bytes(data)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(crafted(), st.integers(512, 128 * KiB), st.integers(0, 1 << 30))
def test_any_bytes_give_one_verdict_and_no_exception(data: bytes, piece: int, seed: int) -> None:
    whole = inspect_bytes(data, len(data) or 1).finish(len(data))
    cut = inspect_bytes(data, (1, piece), seed).finish(len(data))
    assert cut == whole
    assert whole.error is None  # bad input is a verdict about the bytes, not a failure
    judge(whole, Declared(), Policy())  # and the rules take every observation
