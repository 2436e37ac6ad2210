"""CPU cost of the format inspector as a fill's stream consumer, against plain hashing in the
same run (issue 18, "Cost is per piece").

    python -m bench.inspect                  # 1 GiB streams, 3 rounds
    python -m bench.inspect --size 256M --rounds 5

One process, no daemon: each row feeds a virtual image of ``--size`` bytes, piece by piece
(memoryviews over an 8 MiB random buffer, as a fill hands the upstream's buffers on), to one
consumer on this thread, and reports its CPU seconds per GiB (``time.thread_time``, the least
of the rounds: on a shared machine other load only adds to it) and its ratio to sha512 fed the
same pieces (the Digest every verified fill runs). Rows, for 64 KiB, 256 KiB and 1 MiB pieces:

- ``sha512``: cached.digest.Digest, the baseline;
- ``sha256 (a signature's own hash)``: the stream consumer a signature check adds when its
  hash method is not the record's ``os_hash_algo`` (cached/safety/signatures.py);
- ``the loop alone``: a consumer that does nothing (the harness's own cost per piece);
- ``oslo, every piece``: oslo.utils' InspectWrapper fed the whole stream (what a consumer that
  never stopped would cost);
- ``inspector, qcow2``: cached.safety.inspect.Inspector on a clean qcow2 header followed by
  data: decided after 256 KiB, then idle;
- ``inspector, vmdk footer``: on a streamOptimized VMDK whose grain directory is in the footer,
  the worst case: decided but for the footer, it takes every later piece whole to the end.

The images' headers are written here byte by byte (no tools needed); each row's verdict is
printed, so a row that stopped measuring what it claims is visible. Results: the table on
stdout and ``bench/results/inspect-DATE.json`` (gitignored).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from oslo_utils.imageutils import format_inspector

from bench.env import parse_size
from cached.digest import Digest
from cached.safety.inspect import VERSION, Inspector, Phase
from cached.safety.verdict import Declared, Policy, judge

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
PIECES = [64 * KIB, 256 * KIB, MIB]
RESULTS = Path(__file__).resolve().parent / "results"


def qcow2_head(size: int) -> bytes:
    """A clean qcow2 v3 header (no backing file, no data file, no unknown feature)."""
    header = struct.pack(
        ">4sIQIIQIIQQIIQQQQII",
        b"QFI\xfb", 3, 0, 0, 16, size, 0, 1, 3 << 16, 1 << 16, 1, 0, 0, 0, 0, 0, 4, 104,
    )  # fmt: skip
    return header


def vmdk_head_and_footer(size: int) -> tuple[bytes, bytes]:
    """A streamOptimized sparse VMDK: header saying "grain directory in the footer", its
    descriptor, and the 1536-byte end (footer marker, footer, end-of-stream marker)."""
    sectors = size // 512

    def sparse(gd_offset: int) -> bytes:
        fields = (b"KDMV", 3, 0x30001, sectors, 128, 1, 1, 512, 0, gd_offset)
        return struct.pack("<4sIIQQQQIQQ", *fields).ljust(512, b"\0")

    descriptor = (
        '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
        f'createType="streamOptimized"\nRW {sectors} SPARSE "image.vmdk"\n'
    ).encode().ljust(512, b"\0")  # fmt: skip
    head = sparse(0xFFFFFFFFFFFFFFFF) + descriptor
    marker = struct.pack("<QII", 1, 0, 3).ljust(512, b"\0")
    return head, marker + sparse(2) + bytes(512)


def stream(
    size: int, piece: int, head: bytes, tail: bytes, fill: bytes
) -> Iterator[tuple[int, memoryview]]:
    """(offset, piece) over ``size`` bytes: ``head`` first, ``tail`` last, ``fill`` between."""
    first = memoryview(head + fill[len(head) : piece])
    last = memoryview(fill[: piece - len(tail)] + tail)
    body = memoryview(fill)
    pos = 0
    while pos < size:
        if pos == 0:
            yield pos, first
        elif pos + piece >= size:
            yield pos, last
        else:
            start = pos % len(fill)
            yield pos, body[start : start + piece]
        pos += piece


def measure(
    feed: Callable[[int, memoryview], None], pieces: Iterator[tuple[int, memoryview]]
) -> float:
    start = time.thread_time()
    for offset, data in pieces:
        feed(offset, data)
    return time.thread_time() - start


def decision_ms(inspector: Inspector, pieces: Iterator[tuple[int, memoryview]]) -> float:
    """CPU ms the inspector spends until it has decided, or only wants the stream's end."""
    start = time.thread_time()
    for offset, data in pieces:
        inspector.feed(offset, data)
        if inspector.phase is not Phase.HEAD:
            break
    return (time.thread_time() - start) * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.inspect", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1G", help="virtual image size (default 1G)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    size = parse_size(args.size)
    size -= size % MIB
    fill = os.urandom(8 * MIB)
    qcow2 = qcow2_head(size)
    vmdk, footer = vmdk_head_and_footer(size)
    gib = size / GIB

    rows: dict[str, dict[int, float]] = {}
    verdicts: dict[str, str] = {}

    def run(name: str, piece: int, head: bytes, tail: bytes, make: Callable[[], object]) -> None:
        best = None
        for _ in range(args.rounds):
            consumer = make()
            feed = _feeder(consumer)
            spent = measure(feed, stream(size, piece, head, tail, fill))
            best = spent if best is None else min(best, spent)
            if isinstance(consumer, Inspector):
                verdict = judge(consumer.finish(size), Declared(), Policy())
                key = f"{name}, {piece // KIB} KiB pieces"
                verdicts[key] = f"{verdict.outcome.value} {verdict.detected} {verdict.checks}"
                verdicts[key] += f", decided after {consumer.decided_at} bytes"
                until = decision_ms(Inspector(), stream(size, piece, head, tail, fill))
                verdicts[key] += f", {until:.2f} CPU ms until then (or until it kept the tail)"
        assert best is not None
        rows.setdefault(name, {})[piece] = best / gib

    for piece in PIECES:
        run("sha512", piece, qcow2, b"", lambda: Digest("sha512", "0"))
        run("sha256 (a signature's own hash)", piece, qcow2, b"", lambda: Digest("sha256", "0"))
        run("the loop alone", piece, qcow2, b"", _Null)
        run("oslo, every piece", piece, qcow2, b"",
            lambda: format_inspector.InspectWrapper(io.BytesIO()))  # fmt: skip
        run("inspector, qcow2", piece, qcow2, b"", Inspector)
        run("inspector, vmdk footer", piece, vmdk, footer, Inspector)

    base = rows["sha512"]
    print(f"CPU s/GiB over a {size / GIB:g} GiB stream, least of {args.rounds} rounds")
    print(f"(oslo.utils {VERSION}; (x) = / sha512 in the same pieces)\n")
    head = "| consumer | " + " | ".join(f"{p // KIB} KiB pieces" for p in PIECES) + " |"
    print(head)
    print("|---" * (len(PIECES) + 1) + "|")
    for name, by_piece in rows.items():
        cells = [f"{by_piece[p]:.4f} ({by_piece[p] / base[p]:.3f}x)" for p in PIECES]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    for name, text in verdicts.items():
        print(f"{name}: {text}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"inspect-{time.strftime('%Y%m%d-%H%M%S')}.json"
    doc = {"size": size, "rounds": args.rounds, "oslo": VERSION, "cpu_s_per_gib": rows}
    out.write_text(json.dumps({**doc, "verdicts": verdicts}, indent=1))
    print(f"\nwritten to {out}")
    return 0


def _feeder(consumer: object) -> Callable[[int, memoryview], None]:
    """The consumer's feed; a bare InspectWrapper is handed each piece through its source."""
    if isinstance(consumer, format_inspector.InspectWrapper):
        source = _Handed()
        consumer._source = source  # type: ignore[assignment]
        wrapper = consumer

        def feed(_offset: int, data: memoryview) -> None:
            source.data = data
            wrapper.read(len(data))

        return feed
    return consumer.feed  # type: ignore[attr-defined,no-any-return]


class _Null:
    def feed(self, offset: int, data: memoryview) -> None:
        pass


class _Handed:
    def __init__(self) -> None:
        self.data: memoryview | bytes = b""

    def read(self, size: int = -1) -> memoryview | bytes:
        data, self.data = self.data, b""
        return data


if __name__ == "__main__":
    raise SystemExit(main())
