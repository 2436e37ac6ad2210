"""Measurement helpers: CPU of process trees, RSS sampling, I/O counters, quiet gates, stats.

Everything reads ``/proc`` directly, so it works for any server (nginx, Varnish, cached, the
fake origin) without instrumenting it.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")
GIB = 1 << 30
MIB = 1 << 20


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 is field 3, ``state``)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(roots: Iterable[int]) -> float:
    """utime+stime of the process trees under ``roots`` (threads included), in seconds."""
    total = 0
    for root in roots:
        for pid in tree_pids(root):
            fields = _stat_fields(pid)
            if fields:
                total += int(fields[11]) + int(fields[12])
    return total / TICK


def wchar(roots: Iterable[int]) -> int:
    """Bytes written by the trees under ``roots`` (``sendfile`` counts here too)."""
    total = 0
    for root in roots:
        for pid in tree_pids(root):
            try:
                with open(f"/proc/{pid}/io") as f:
                    for line in f:
                        if line.startswith("wchar:"):
                            total += int(line.split()[1])
            except OSError:
                pass
    return total


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mib(roots: Iterable[int], key: str = "VmRSS") -> float:
    """Sum of ``key`` (VmRSS or VmHWM) over the trees under ``roots``, in MiB."""
    return sum(_status_kib(p, key) for r in roots for p in tree_pids(r)) / 1024


class RssSampler:
    """Samples VmRSS of process trees every ``interval`` s while in a ``with`` block."""

    def __init__(self, roots: Sequence[int], interval: float = 0.05) -> None:
        self.roots = list(roots)
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib(self.roots))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib(self.roots))


def _busy_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return sum(vals[:8]) - idle, sum(vals[:8])


# How long a quiet gate waits before going ahead anyway (the CLI sets it per mode).
QUIET_MAX_WAIT = 3.0


def main_thread_sched(pid: int) -> tuple[float, float]:
    """Seconds the main thread of ``pid`` (cached's event loop) has run on a CPU, and has
    waited runnable for one (``/proc/PID/task/PID/schedstat``; zeros if it is gone)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
            ran, waited = f.read().split()[:2]
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(ran) / 1e9, int(waited) / 1e9


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (all CPUs)."""
    return _busy_jiffies()[0] / TICK


def wait_quiet(
    threshold: float = 0.05, window: float = 0.25, max_wait: float | None = None
) -> float:
    """Wait until the whole machine was < ``threshold`` busy for ``window`` s; return waited s.

    Gives up after ``max_wait`` s (default ``QUIET_MAX_WAIT``): the run goes ahead, and the
    foreign CPU it records shows the noise.
    """
    max_wait = QUIET_MAX_WAIT if max_wait is None else max_wait
    start = time.monotonic()
    while True:
        b0, t0 = _busy_jiffies()
        time.sleep(window)
        b1, t1 = _busy_jiffies()
        if t1 == t0 or (b1 - b0) / (t1 - t0) < threshold:
            break
        if time.monotonic() - start > max_wait:
            break
    return time.monotonic() - start


def wait_io_idle(roots: Sequence[int], still: float = 0.3, max_wait: float = 120.0) -> float:
    """Wait until the trees under ``roots`` wrote nothing for ``still`` s (a fill has ended)."""
    start = time.monotonic()
    last = wchar(roots)
    quiet_since = time.monotonic()
    while time.monotonic() - start < max_wait:
        time.sleep(0.1)
        now = wchar(roots)
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= still:
            break
    return time.monotonic() - start


def settle(io_roots: Sequence[int] = ()) -> None:
    """Before a timed run: background fills done, dirty pages written back, CPU quiet."""
    if io_roots:
        wait_io_idle(io_roots)
    os.sync()
    wait_quiet()


@dataclass
class CpuMeter:
    """CPU seconds used by named process trees between ``start()`` and ``stop()``."""

    roots: dict[str, list[int]]
    used: dict[str, float] = field(default_factory=dict)
    _before: dict[str, float] = field(default_factory=dict)

    def start(self) -> CpuMeter:
        self._before = {k: cpu_seconds(v) for k, v in self.roots.items()}
        return self

    def stop(self) -> dict[str, float]:
        self.used = {k: cpu_seconds(v) - self._before[k] for k, v in self.roots.items()}
        return self.used


@dataclass
class Stat:
    """Samples of one metric; rendered as the median."""

    samples: list[float] = field(default_factory=list)

    def add(self, value: float | None) -> None:
        if value is not None:
            self.samples.append(value)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def to_json(self) -> dict[str, object]:
        s = self.samples
        return {
            "median": self.median,
            "min": min(s) if s else None,
            "max": max(s) if s else None,
            "samples": s,
        }


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (``p`` in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def digest_cost(path: str, algo: str, block: int = 4 * MIB) -> dict[str, float]:
    """CPU s/GiB and MB/s of ``hashlib.<algo>`` over a (page-cached) file, in this process."""
    h = hashlib.new(algo)
    buf = bytearray(block)
    view = memoryview(buf)
    total = 0
    c0, w0 = time.process_time(), time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            total += n
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return {"cpu_s_per_gib": cpu / (total / GIB), "mb_s": total / wall / 1e6, "bytes": total}


def page_write_cost(
    directory: str, size: int, segment: int = GIB, piece: int = MIB
) -> dict[str, Any]:
    """CPU s/GiB (this process, ``time.process_time``) and wall MB/s of ``pwritev`` in
    ``piece``-sized writes into a new file of ``size`` bytes in ``directory`` (every page a new
    page-cache page, as a cache fill writes), for the whole file and for each ``segment`` of it
    in order; then of overwriting its last segment (pages still cached). The file is deleted
    (its dirty pages dropped unwritten). Which pages a new file gets depends on what the
    machine freed just before (recently freed pages come back first), hence the segments."""
    buf = os.urandom(piece)
    path = os.path.join(directory, f"page-write-{os.getpid()}-{time.time_ns()}.tmp")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def write(start: int, end: int) -> tuple[float, float]:
        c0, w0 = time.process_time(), time.perf_counter()
        for off in range(start, end, piece):
            os.pwritev(fd, [buf[: min(piece, end - off)]], off)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        return cpu / ((end - start) / GIB), (end - start) / wall / 1e6

    try:
        segments = [write(a, min(a + segment, size)) for a in range(0, size, segment)]
        last = (len(segments) - 1) * segment
        overwrite = write(last, size)
    finally:
        os.close(fd)
        os.unlink(path)
    lengths = [min(segment, size - a) for a in range(0, size, segment)]
    cpu = sum(c * n for (c, _), n in zip(segments, lengths, strict=True)) / size
    wall = sum(n / (m * 1e6) for (_, m), n in zip(segments, lengths, strict=True))
    return {
        "bytes": size,
        "fresh_cpu_s_per_gib": cpu,
        "fresh_mb_s": size / wall / 1e6,
        "segments": [{"cpu_s_per_gib": c, "mb_s": m} for c, m in segments],
        "overwrite_cpu_s_per_gib": overwrite[0],
        "overwrite_mb_s": overwrite[1],
    }


def hash_cost(algo: str, size: int, block: int = 64 * MIB) -> dict[str, float]:
    """CPU s/GiB and MB/s of ``hashlib.<algo>`` over ``size`` bytes of memory (a ``block`` of
    random bytes hashed over and over, in 1 MiB updates), in this process."""
    buf = os.urandom(min(block, size))
    view = memoryview(buf)
    h = hashlib.new(algo)
    c0, w0 = time.process_time(), time.perf_counter()
    done = 0
    while done < size:
        for off in range(0, len(buf), MIB):
            n = min(MIB, len(buf) - off, size - done)
            if n <= 0:
                break
            h.update(view[off : off + n])
            done += n
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return {"cpu_s_per_gib": cpu / (size / GIB), "mb_s": size / wall / 1e6, "bytes": size}
