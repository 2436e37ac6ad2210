"""A/B of small-image hit throughput between builds of cached, in one run.

Every build (a source tree, run with ``PYTHONPATH=<tree>``) serves the same 64 KiB image from
its own cache directory in front of one ``file://`` upstream (the set-up of issue 8's note:
no HTTP origin, so the upstream's cost is cached's own). All daemons run at once; the rounds
alternate between them (the order rotates each round), each round a ``wrk -t2 -c32`` run
against one daemon after a quiet gate. Reported per build: median req/s (and the range),
median and least ("best") server CPU µs per request (utime+stime of the daemon and its
threads from ``/proc``; on a shared machine other load only adds to it, so the least is the
steadier figure), the part of it on the event loop's thread, p50/p99 latency, context
switches per request, and each build's ratio to the first build's.

    python -m bench.hitab --tree base=/tmp/base --tree new=. --rounds 6 --seconds 8

A tree is any checkout of cached (``git archive <commit> | tar -x -C DIR`` makes one); a
tree's daemon gets ``extra`` YAML options with ``--option key=value`` (all trees alike).
Results: a table on stdout and ``bench/results/hitab-DATE.json`` (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench import clients, measure

_LISTEN_RE = re.compile(r"listening on (http://\S+)")
_MAIN = "import sys; from cached.cli import main; sys.exit(main())"


@dataclass
class Build:
    name: str
    tree: Path
    work: Path
    options: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    rounds: list[dict[str, float]] = field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.work / f"{self.name}.log"

    def start(self, images: Path) -> None:
        cache = self.work / f"cache-{self.name}"
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        config = self.work / f"{self.name}.yaml"
        config.write_text("".join(f"{k}: {v}\n" for k, v in self.options.items()) or "{}\n")
        env = {**os.environ, "PYTHONPATH": str(self.tree)}
        cmd = [sys.executable, "-c", _MAIN, "serve", "-c", str(config)]
        cmd += ["--listen", "127.0.0.1:0", "--upstream", f"file://{images}"]
        cmd += ["--cache-dir", str(cache)]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = _LISTEN_RE.search(self.log.read_text(errors="replace"))
            if m:
                self.url = m[1]
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: never listened:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _switches(pid: int) -> int:
    """Context switches of every thread of ``pid`` so far (voluntary and not): each hand-off
    of a call to a worker thread and back costs some, whatever else runs on the machine."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if "ctxt_switches:" in line:  # voluntary_ and nonvoluntary_
                        total += int(line.split()[-1])
        except (OSError, ValueError):
            continue
    return total


def _loop_cpu(pid: int) -> float:
    """CPU seconds of the daemon's main thread (the event loop) so far."""
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / measure.TICK


def _get(url: str) -> tuple[int, str, int]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = resp.read()
        return resp.status, resp.headers.get("Cache-Status", ""), len(body)


def _warm(build: Build, image_id: str, size: int) -> str:
    """GET until the image is a hit (the fill commits in the background)."""
    url = f"{build.url}/v2/images/{image_id}/file"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, cache_status, n = _get(url)
        if status != 200 or n != size:
            raise RuntimeError(f"{build.name}: {status}, {n} of {size} bytes")
        if cache_status == "cached; hit":
            return url
        time.sleep(0.05)
    raise RuntimeError(f"{build.name}: never a hit")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hitab", description=__doc__.split("\n")[0])
    p.add_argument("--tree", action="append", required=True, help="NAME=DIR (first: reference)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--size", type=int, default=64 << 10, help="image bytes (64 KiB)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--option", action="append", default=[], help="key=value for every daemon")
    p.add_argument("--workdir", type=Path, default=None, help="default: a new temp dir")
    args = p.parse_args(argv)
    if not clients.wrk_available():
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="hitab-"))
    work.mkdir(parents=True, exist_ok=True)
    images = work / "images"
    images.mkdir(exist_ok=True)
    image_id = str(uuid.uuid4())
    (images / image_id).write_bytes(os.urandom(args.size))
    options = dict(o.split("=", 1) for o in args.option)
    builds = []
    for spec in args.tree:
        name, _, tree = spec.partition("=")
        builds.append(Build(name, Path(tree).resolve(), work, options))
    try:
        for b in builds:
            b.start(images)
        urls = {b.name: _warm(b, image_id, args.size) for b in builds}
        for r in range(args.rounds):
            order = builds[r % len(builds) :] + builds[: r % len(builds)]
            for b in order:
                measure.wait_quiet(max_wait=5.0)
                assert b.proc is not None
                busy0 = measure.busy_seconds()
                switches, loop = _switches(b.proc.pid), _loop_cpu(b.proc.pid)
                meter = measure.CpuMeter({"server": [b.proc.pid]}).start()
                w = clients.wrk(urls[b.name], args.seconds, args.threads, args.conns)
                cpu = meter.stop()["server"]
                switches = _switches(b.proc.pid) - switches
                loop = _loop_cpu(b.proc.pid) - loop
                busy = measure.busy_seconds() - busy0
                if w.non_2xx or not w.requests or w.socket_errors:
                    print(f"  {b.name}: {w.non_2xx} non-2xx, errors: {w.socket_errors}")
                row = {
                    "req_s": w.req_s,
                    "cpu_us": cpu * 1e6 / max(1, w.requests),
                    "loop_us": loop * 1e6 / max(1, w.requests),
                    "p50_ms": w.p50_ms or 0.0,
                    "p99_ms": w.p99_ms or 0.0,
                    "machine_busy_s": busy,
                    "switches_per_req": switches / max(1, w.requests),
                }
                b.rounds.append(row)
                print(
                    f"round {r + 1} {b.name:>8}: {w.req_s:8.1f} req/s "
                    f"{row['cpu_us']:6.0f} µs/req (loop {row['loop_us']:4.0f})  "
                    f"p50 {row['p50_ms']:.2f} ms "
                    f"{row['switches_per_req']:.1f} cs/req",
                    flush=True,
                )
    finally:
        for b in builds:
            b.stop()
    ref = builds[0]
    print()
    print(
        f"{args.size >> 10} KiB hits, file upstream, wrk -t{args.threads} -c{args.conns} "
        f"-d{args.seconds:g}s, {args.rounds} rounds (medians; ratio to {ref.name})"
    )
    print(
        f"{'build':>10} {'req/s':>8} {'min-max':>15} {'ratio':>6} {'µs/req':>7} "
        f"{'ratio':>6} {'best µs':>7} {'ratio':>6} {'loop µs':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'cs/req':>6}"
    )

    def med(b: Build, key: str) -> float:
        return statistics.median(x[key] for x in b.rounds)

    def best(b: Build) -> float:
        """The least CPU per request of any round: other load on the machine only adds."""
        return min(x["cpu_us"] for x in b.rounds)

    for b in builds:
        rs = [x["req_s"] for x in b.rounds]
        print(
            f"{b.name:>10} {med(b, 'req_s'):8.0f} {min(rs):7.0f}-{max(rs):<7.0f} "
            f"{med(b, 'req_s') / med(ref, 'req_s'):6.2f} {med(b, 'cpu_us'):7.0f} "
            f"{med(b, 'cpu_us') / med(ref, 'cpu_us'):6.2f} {best(b):7.0f} "
            f"{best(b) / best(ref):6.2f} {med(b, 'loop_us'):7.0f} {med(b, 'p50_ms'):7.2f} "
            f"{med(b, 'p99_ms'):7.2f} "
            f"{med(b, 'switches_per_req'):6.1f}"
        )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    path = out / f"hitab-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "builds": {b.name: {"tree": str(b.tree), "rounds": b.rounds} for b in builds},
            },
            indent=1,
        )
    )
    print(f"raw: {path}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
