"""Time per entry of a re-inspection (issue 18: the first hit of an entry without a current
verdict, the ``audit`` job, an admin's recheck).

    python -m bench.reinspect                 # 20 rounds per image, 1,000-entry audit
    python -m bench.reinspect --entries 5000

Two parts, one process, no daemon:

- per format: ``qemu-img`` makes a 1 GiB virtual qcow2, vmdk (flat and streamOptimized),
  vhd, vhdx, vdi (skipped without qemu-img), plus 64 MiB of random raw; each is inspected
  from its file as a re-inspection does (cached.safety.reinspect: aligned 64 KiB reads until
  decided, judged), ``--rounds`` times; the median wall and thread-CPU milliseconds. The
  files are in the page cache after the first round: a cold disk adds its reads.
- an audit: ``--entries`` complete entries (a small qcow2 with a backing file each) in a real
  Store in a temporary directory, their verdicts made by "another oslo.utils"; one
  :meth:`Safety.audit` pass re-inspects all of them and renews their commit records. Its
  ``ms_per_entry`` (wall, in the I/O thread) and CPU ms per entry.

Results on stdout and ``bench/results/reinspect-DATE.json`` (gitignored).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from cached.safety import record
from cached.safety.audit import Safety
from cached.safety.inspect import Inspector
from cached.safety.verdict import Declared, Outcome, Policy, Verdict, judge
from cached.store import Entry, Store

FORMATS = [
    ("qcow2", ["-f", "qcow2"]),
    ("vmdk", ["-f", "vmdk"]),
    ("vmdk streamOptimized", ["-f", "vmdk", "-o", "subformat=streamOptimized"]),
    ("vhd", ["-f", "vpc"]),
    ("vhdx", ["-f", "vhdx"]),
    ("vdi", ["-f", "vdi"]),
]


def per_format(directory: Path, rounds: int) -> list[dict[str, Any]]:
    images: list[tuple[str, Path]] = []
    tool = shutil.which("qemu-img")
    for n, (name, args) in enumerate(FORMATS if tool else []):
        path = directory / f"image-{n}"
        subprocess.run([tool, "create", "-q", *args, str(path), "1G"], check=True)  # type: ignore[list-item]
        images.append((name, path))
    raw = directory / "raw"
    raw.write_bytes(os.urandom(64 << 20))
    images.append(("raw 64 MiB", raw))
    rows = []
    for name, path in images:
        size = path.stat().st_size
        walls, cpus = [], []
        for _ in range(rounds):
            wall, cpu = time.perf_counter(), time.thread_time()
            fd = os.open(path, os.O_RDONLY)
            try:
                seen = Inspector().catch_up(fd, size)
            finally:
                os.close(fd)
            verdict = judge(seen, Declared(), Policy())
            walls.append(time.perf_counter() - wall)
            cpus.append(time.thread_time() - cpu)
        rows.append(
            {
                "image": name,
                "verdict": verdict.outcome.value,
                "wall_ms": round(1000 * statistics.median(walls), 3),
                "cpu_ms": round(1000 * statistics.median(cpus), 3),
            }
        )
    return rows


def backing_qcow2(directory: Path) -> bytes:
    """A small qcow2 with a backing file (random bytes without qemu-img)."""
    tool = shutil.which("qemu-img")
    if tool is None:
        return os.urandom(256 << 10)
    base, head = str(directory / "base"), str(directory / "head.qcow2")
    subprocess.run([tool, "create", "-q", "-f", "raw", base, "1M"], check=True)
    subprocess.run([tool, "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", head], check=True)
    return Path(head).read_bytes()


async def audit(directory: Path, entries: int, data: bytes) -> dict[str, Any]:
    store = Store(directory / "cache")
    store.root.mkdir()
    await store.open()
    old = Verdict(Outcome.SAFE, "qcow2", "raw", (), (), None, "0.0.1", Policy().fingerprint())
    stale = record.dumps(old)
    digest = hashlib.sha512(data).hexdigest()

    def fill(entry: Entry) -> None:
        fd = os.open(entry.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, 0)
            os.setxattr(fd, record.NAME, stale)
        finally:
            os.close(fd)

    for _ in range(entries):
        entry = await store.create(
            str(uuid.uuid4()), len(data), checksum=None, os_hash_algo="sha512", os_hash_value=digest
        )
        await store.run(fill, entry)
        entry.present.update(range(entry.present.count))
        await store.commit(entry)
    safety = Safety(Policy(), file_backend=False, run=store.run)
    result = await safety.audit(store.complete_entries, lambda e: e.suspect)
    await store.aclose()
    return result.to_json()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.reinspect", description=__doc__.split("\n")[0]
    )
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--entries", type=int, default=1000)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # (a verdict line per entry otherwise)
    with tempfile.TemporaryDirectory(prefix="bench-reinspect-") as tmp:
        rows = per_format(Path(tmp), args.rounds)
        for row in rows:
            name, verdict, wall, cpu = row["image"], row["verdict"], row["wall_ms"], row["cpu_ms"]
            print(f"{name:<22} {verdict:<8} {wall:8.3f} ms  {cpu:8.3f} CPU ms")
        data = backing_qcow2(Path(tmp))
        result = asyncio.run(audit(Path(tmp), args.entries, data))
    print(
        f"audit of {result['entries']} entries: {result['ms_per_entry']} ms per entry "
        f"({result['cpu_ms_per_entry']} CPU ms), {result['seconds']} s in all"
    )
    out = Path(__file__).parent / "results" / f"reinspect-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"formats": rows, "audit": result}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
