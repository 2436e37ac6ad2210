"""Load generators: curl processes (PEERS.md's method), wrk, and dd for the page-cache ceiling."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

TOKEN = "bench-token"
_WFMT = (
    "%{http_code} %{size_download} %{speed_download} %{time_starttransfer} %{time_total}"
    "\\t%header{cache-status}\\t%header{x-cache}\\n"
)


@dataclass
class Fetch:
    """One curl transfer. Times in seconds; ``start`` is relative to the batch launch."""

    url: str
    code: int
    size: int
    mb_s: float
    ttfb: float
    total: float
    cache_status: str
    x_cache: str
    client_cpu: float
    start: float = 0.0
    error: str = ""

    @property
    def done(self) -> float:
        return self.start + self.total

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _argv(url: str, rng: str | None, out: str | None, max_time: float) -> list[str]:
    argv = [
        "curl",
        "-s",
        "-o",
        out or "/dev/null",
        "-w",
        _WFMT,
        "-H",
        f"X-Auth-Token: {TOKEN}",
        "--max-time",
        str(max_time),
    ]
    if rng:
        argv += ["-r", rng]
    return [*argv, url]


def _parse(url: str, stdout: bytes, stderr: bytes, status: int, cpu: float, start: float) -> Fetch:
    line = stdout.decode(errors="replace").strip("\n")
    try:
        nums, cache_status, x_cache = [*line.split("\t"), "", ""][:3]
        code, size, speed, ttfb, total = nums.split()
        return Fetch(
            url,
            int(code),
            int(size),
            float(speed) / 1e6,
            float(ttfb),
            float(total),
            cache_status.strip(),
            x_cache.strip(),
            cpu,
            start,
            "" if status == 0 else f"curl exit {status}",
        )
    except ValueError:
        return Fetch(
            url,
            0,
            0,
            0.0,
            0.0,
            0.0,
            "",
            "",
            cpu,
            start,
            f"curl exit {status}: {line!r} {stderr.decode(errors='replace')[:200]}",
        )


def fetch_many(
    urls: Sequence[str],
    rng: str | None = None,
    outs: Sequence[str | None] | None = None,
    max_time: float = 600,
) -> list[Fetch]:
    """Start one curl per URL at once; wait for all; per-client results in URL order."""
    outs = outs or [None] * len(urls)
    procs = []
    t0 = time.monotonic()
    for url, out in zip(urls, outs, strict=True):
        p = subprocess.Popen(
            _argv(url, rng, out, max_time), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        procs.append((p, time.monotonic() - t0))
    results = []
    for (p, start), url in zip(procs, urls, strict=True):
        assert p.stdout is not None and p.stderr is not None
        stdout, stderr = p.stdout.read(), p.stderr.read()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        p.stdout.close()
        p.stderr.close()
        cpu = usage.ru_utime + usage.ru_stime
        results.append(_parse(url, stdout, stderr, p.returncode, cpu, start))
    return results


def fetch(url: str, rng: str | None = None, out: str | None = None) -> Fetch:
    """One curl transfer."""
    return fetch_many([url], rng, [out])[0]


def md5_of_url(url: str) -> str:
    """md5 of a full download (curl | md5sum): checks the bytes, untimed."""
    curl = subprocess.Popen(
        ["curl", "-sf", "-H", f"X-Auth-Token: {TOKEN}", url], stdout=subprocess.PIPE
    )
    out = subprocess.run(["md5sum"], stdin=curl.stdout, capture_output=True, text=True)
    curl.wait()
    return out.stdout.split()[0] if curl.returncode == 0 else f"curl exit {curl.returncode}"


@dataclass
class WrkResult:
    req_s: float
    p50_ms: float | None
    p99_ms: float | None
    requests: int
    non_2xx: int
    socket_errors: str
    raw: str


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[m.group(2)]


def wrk(url: str, seconds: float, threads: int = 2, conns: int = 32) -> WrkResult:
    """``wrk -tT -cC -dDs --latency`` with the bench token (PEERS.md 2f)."""
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{conns}",
            f"-d{seconds:g}s",
            "--latency",
            "-H",
            f"X-Auth-Token: {TOKEN}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    req_s = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    return WrkResult(
        req_s=float(req_s.group(1)) if req_s else 0.0,
        p50_ms=_ms(lat["50"]) if "50" in lat else None,
        p99_ms=_ms(lat["99"]) if "99" in lat else None,
        requests=int(total.group(1)) if total else 0,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sock.group(1) if sock else "",
        raw=out,
    )


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def dd_many(paths: Sequence[Path]) -> tuple[float, int]:
    """Read files with ``dd bs=4M`` in parallel (the page-cache ceiling); (wall s, bytes)."""
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(["dd", f"if={p}", "of=/dev/null", "bs=4M"], stderr=subprocess.DEVNULL)
        for p in paths
    ]
    for p in procs:
        p.wait()
    return time.monotonic() - t0, sum(p.stat().st_size for p in paths)
