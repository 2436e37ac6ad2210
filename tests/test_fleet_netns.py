"""Peer fill across real network links (issue 17, the namespace tier): three members and the
origin, each in its own network namespace, joined by veth pairs to a bridge in a fifth
namespace; rates set by ``tc qdisc ... tbf`` on the veths; a partition made by
``ip link set down`` on a member's veth while a sibling copies from it.

Root only (namespaces, veths, qdiscs): skipped with the reason otherwise, unless
``CACHED_TOOLS_REQUIRED`` is set (CI), where a missing tool fails. Everything lives in
namespaces named ``cfn<random>-*`` created here and deleted in ``finally`` (their veths and
bridge go with them), so the host's own network is never touched; the daemons' and the
origin's cache, data and logs are in ``tmp_path``. The origin is the bench's fake Glance
(``python -m bench.origin``, run from the repository root), which serves records and data
with Range and accepts any token.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemonproc import cached_command

from cached.fleet import ring

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
IDS = ("ctl-a", "ctl-b", "ctl-c")
NET = "10.213.0"
ORIGIN_IP = f"{NET}.10"
PORT = 9292
ADMIN = f"sha256:{hashlib.sha256(b'netns-admin').hexdigest()}"
DATA_GET = re.compile(r'"GET /v2/images/([^/ ]+)/file HTTP/1.1" \d+ (\d+) range="([^"]*)"')


def member_ip(i: int) -> str:
    return f"{NET}.{11 + i}"


def missing(reason: str) -> None:
    if os.environ.get("CACHED_TOOLS_REQUIRED"):
        pytest.fail(f"{reason} (required here)")
    pytest.skip(reason)


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=20)


def until(check: Callable[[], bool], what: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


class Net:
    """A bridge in namespace ``hub`` and one namespace per host, each with a veth on it."""

    def __init__(self) -> None:
        self.prefix = f"cfn{secrets.token_hex(3)}"
        self.hub = f"{self.prefix}-hub"
        self.made: list[str] = []

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def add_ns(self, name: str) -> str:
        ns = self.ns(name)
        run("ip", "netns", "add", ns)
        self.made.append(ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def start(self) -> None:
        self.made.append(self.hub)
        run("ip", "netns", "add", self.hub)
        run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.hub, "link", "set", "br0", "up")

    def host(self, name: str, ip: str, hub_side: str) -> str:
        """Namespace ``name`` with veth ``eth0`` (address ``ip``) bridged in the hub."""
        ns = self.add_ns(name)
        run("ip", "-n", self.hub, "link", "add", hub_side, "type", "veth", "peer", "name", "eth0")
        run("ip", "-n", self.hub, "link", "set", "eth0", "netns", ns)
        run("ip", "-n", self.hub, "link", "set", hub_side, "master", "br0", "up")
        run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        return ns

    def rate(self, ns: str, mbit: int) -> None:
        """Cap what ``ns`` sends on its veth (tc tbf)."""
        run(
            "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
            "rate", f"{mbit}mbit", "burst", "256kb", "latency", "100ms",
        )  # fmt: skip

    def link(self, ns: str, up: bool) -> None:
        run("ip", "-n", ns, "link", "set", "eth0", "up" if up else "down")

    def close(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


@contextlib.contextmanager
def network() -> Iterator[Net]:
    net = Net()
    try:
        net.start()
        yield net
    finally:
        net.close()


class Proc:
    """A process in a namespace (``ip netns exec`` execs it: the pid is the process's)."""

    def __init__(self, ns: str, argv: list[str], log: Path, cwd: Path | None = None) -> None:
        self.log = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, within: float = 30.0) -> None:
        until(
            lambda: text in self.output() or self.popen.poll() is not None,
            f"{text!r} in {self.log}",
            within,
        )
        assert text in self.output(), self.output()[-3000:]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)


def publish(www: Path, data: bytes) -> str:
    """An image in the origin's tree (``bench.origin``'s layout): data file and record."""
    image_id = str(uuid.uuid4())
    (www / "images").mkdir(parents=True, exist_ok=True)
    (www / "records").mkdir(parents=True, exist_ok=True)
    (www / "images" / image_id).write_bytes(data)
    record = {
        "id": image_id,
        "name": "netns",
        "status": "active",
        "visibility": "public",
        "size": len(data),
        "checksum": hashlib.md5(data).hexdigest(),
        "os_hash_algo": "sha512",
        "os_hash_value": hashlib.sha512(data).hexdigest(),
        "disk_format": "raw",
        "container_format": "bare",
        "owner": "netns",
        "file": f"/v2/images/{image_id}/file",
        "self": f"/v2/images/{image_id}",
    }
    (www / "records" / f"{image_id}.json").write_text(json.dumps(record))
    return image_id


def data_gets(log: Path, image_id: str) -> list[tuple[int, str]]:
    """(bytes sent, Range) of every data GET of ``image_id`` in the origin's access log,
    authorisation probes (``bytes=0-0``) left out."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return [
        (int(m[2]), m[3])
        for m in DATA_GET.finditer(text)
        if m[1] == image_id and m[3] != "bytes=0-0"
    ]


def download(ns: str, ip: str, image_id: str, out: Path) -> subprocess.Popen[bytes]:
    """curl in ``ns`` from the member at ``ip``, body to ``out``; prints code and size."""
    url = f"http://{ip}:{PORT}/v2/images/{image_id}/file"
    argv = ["curl", "-s", "-o", str(out), "-w", "%{http_code} %{size_download}"]
    argv += ["-H", "X-Auth-Token: netns", "--max-time", "40", url]
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE)


@dataclass
class World:
    """The namespaces, the origin and three members serving one 32 MiB image."""

    net: Net
    origin_log: Path
    members: dict[str, tuple[str, Proc]]  # member id -> (its namespace, its daemon)
    image_id: str
    data: bytes


@contextlib.contextmanager
def world(tmp_path: Path, origin_mbit: int) -> Iterator[World]:
    """Root only (else skipped); the origin's veth capped at ``origin_mbit``; every
    process killed and every namespace deleted on the way out, failure or not."""
    if os.geteuid() != 0:
        missing("the namespace tier needs root (network namespaces, veths, tc)")
    for tool in ("ip", "tc", "curl"):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed (.ci/run installs iproute2 and curl)")
    data = os.urandom(32 * MiB)
    www = tmp_path / "www"
    image_id = publish(www, data)
    key = tmp_path / "fleet.key"
    key.write_bytes(os.urandom(48).hex().encode())
    key.chmod(0o600)
    procs: list[Proc] = []
    with network() as net:
        try:
            origin_ns = net.host("origin", ORIGIN_IP, "h-origin")
            net.rate(origin_ns, origin_mbit)
            origin_log = tmp_path / "origin-access.log"
            origin = Proc(
                origin_ns,
                [sys.executable, "-m", "bench.origin", "--root", str(www), "--port", str(PORT)]
                + ["--host", ORIGIN_IP, "--log", str(origin_log)],
                tmp_path / "origin.out",
                cwd=ROOT,
            )
            procs.append(origin)
            members: dict[str, tuple[str, Proc]] = {}
            for i, member in enumerate(IDS):
                ns = net.host(member, member_ip(i), f"h-{member}")
                config = tmp_path / f"{member}.yaml"
                config.write_text(
                    json.dumps(
                        {
                            "fleet_self": member,
                            "fleet_members": [
                                {"id": m, "url": f"http://{member_ip(j)}:{PORT}"}
                                for j, m in enumerate(IDS)
                            ],
                            "fleet_secret_file": str(key),
                            "fleet_lookup_timeout": 2.0,
                            "fleet_stall_timeout": 2.0,
                            "fleet_min_copy_rate": 0,  # the links are slow on purpose
                            "admin_tokens": [ADMIN],
                        }
                    )
                )
                cache = tmp_path / f"cache-{member}"
                cache.mkdir()
                argv = [*cached_command(), "serve", "--listen", f"{member_ip(i)}:{PORT}"]
                argv += ["--upstream", f"http://{ORIGIN_IP}:{PORT}", "--cache-dir", str(cache)]
                argv += ["-c", str(config)]
                proc = Proc(ns, argv, tmp_path / f"{member}.log")
                procs.append(proc)
                members[member] = (ns, proc)
            origin.wait_for("listening on")
            for _, proc in members.values():
                proc.wait_for("listening on")
            yield World(net, origin_log, members, image_id, data)
        finally:
            for proc in procs:
                proc.stop()


def fetch_on(w: World, member: str, out: Path) -> subprocess.Popen[bytes]:
    ns, _ = w.members[member]
    return download(ns, member_ip(IDS.index(member)), w.image_id, out)


def cut_and_check(
    w: World, holder: str, member: str, body: Path, fetch: subprocess.Popen[bytes]
) -> str:
    """Once 8 MiB of ``member``'s copy from ``holder`` reached its client, set the holder's
    veth down; the client's body must be the image and the rest must come from the
    upstream, from where the copy stopped. Returns a line for the log."""
    until(
        lambda: body.exists() and body.stat().st_size >= 8 * MiB,
        "8 MiB of the sibling's bytes reached the client",
    )
    _, proc = w.members[member]
    assert f"{w.image_id} [0, {len(w.data)}) from sibling {holder}" in proc.output()
    holder_ns, _ = w.members[holder]
    w.net.link(holder_ns, up=False)
    cut_at, had = time.monotonic(), body.stat().st_size
    out = fetch.communicate(timeout=40)[0]
    after = time.monotonic() - cut_at
    assert out == f"200 {len(w.data)}".encode(), proc.output()[-3000:]
    assert hashlib.sha256(body.read_bytes()).digest() == hashlib.sha256(w.data).digest()
    proc.wait_for(f"cached {w.image_id}: {len(w.data)} bytes, sha512 verified")
    resumed = [r for _, r in data_gets(w.origin_log, w.image_id) if r]
    assert len(resumed) == 1, data_gets(w.origin_log, w.image_id)
    resumed_at = int(resumed[0].removeprefix("bytes=").split("-")[0])
    assert 8 * MiB <= resumed_at < len(w.data), resumed
    return (
        f"partition with {had / MiB:.1f} MiB at the client: the rest from the upstream at "
        f"{resumed_at / MiB:.1f} MiB, client done {after:.1f} s after the cut"
    )


def test_a_partition_during_a_peer_copy_resumes_from_the_upstream(tmp_path: Path) -> None:
    """The image's owner holds a verified copy; a second member's client asks for it and the
    member copies from the owner over a 64 Mbit/s link. Once 8 MiB went over it, the owner's
    veth goes down (``ip link set down``): the copy stalls, and after the stall timeout (2 s
    here) the fill takes the rest from the upstream, from where the copy stopped (a second
    upstream data GET with a Range starting past 0). The client's body is the image."""
    started = time.monotonic()
    with world(tmp_path, origin_mbit=256) as w:  # the upstream: 32 MiB/s
        owner, second, _ = ring.order(IDS, w.image_id)
        first = fetch_on(w, owner, tmp_path / "a")
        assert first.communicate(timeout=40)[0] == f"200 {len(w.data)}".encode()
        _, owner_proc = w.members[owner]
        owner_proc.wait_for(f"cached {w.image_id}: {len(w.data)} bytes, sha512 verified")
        assert [r for _, r in data_gets(w.origin_log, w.image_id)] == [""]

        w.net.rate(w.members[owner][0], 64)  # 8 MiB/s out of the owner
        body = tmp_path / "b"
        line = cut_and_check(w, owner, second, body, fetch_on(w, second, body))
        print(f"{line}; whole test {time.monotonic() - started:.1f} s")


def test_a_partition_while_following_a_sibling_fill_resumes_from_the_upstream(
    tmp_path: Path,
) -> None:
    """The owner's fill runs, fed by the upstream at 64 Mbit/s; a second member's client asks
    for the image and the member follows that running fill (``filling; source=upstream``).
    Once 8 MiB reached its client, the owner's veth goes down (its own fill stops with it):
    after the stall timeout the follower takes the rest from the upstream, from where it was;
    its client's body is the image."""
    started = time.monotonic()
    with world(tmp_path, origin_mbit=64) as w:  # the upstream: 8 MiB/s
        owner, second, _ = ring.order(IDS, w.image_id)
        first = fetch_on(w, owner, tmp_path / "a")
        until(lambda: (tmp_path / "a").exists(), "the owner's client got its first bytes")
        body = tmp_path / "b"
        line = cut_and_check(w, owner, second, body, fetch_on(w, second, body))
        first.kill()
        first.wait(10)
        print(f"{line}; whole test {time.monotonic() - started:.1f} s")
