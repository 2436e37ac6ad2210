"""Peer fill across real network links (issue 17, the namespace tier): every member of a
three-member fleet and the upstream in a network namespace of its own, joined by veth pairs
to a bridge in a hub namespace, so that a link can be slowed (``tc ... tbf``) or cut
(``ip link set ... down``) under a running transfer as on a controller network.

The namespaces are unnamed: each is held by a ``sleep`` started with ``unshare --net`` and
entered by its ``/proc/<pid>/ns/net``, so nothing is written under ``/run/netns`` and every
namespace, veth and bridge vanishes with its holder, even when the test fails. The fake
Glance runs in this process on a socket made inside the origin's namespace (``setns`` on this
thread for the moment of ``socket()``/``bind()``); the daemons run under ``nsenter``, which
execs them (their pid is the daemon's, so signals reach it); clients are ``curl`` under
``nsenter`` in a member's namespace.

Root only (namespaces, veths, qdiscs); otherwise skipped with the reason, unless
``$CACHED_TOOLS_REQUIRED`` (CI) says the tier must run.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import TOKENS
from daemonproc import CachedProcess, cached_command
from fakeglance import FakeGlance
from test_correctness import until

from cached.fleet import ring

MiB = 1 << 20
IDS = ("ctl-a", "ctl-b", "ctl-c")
SUBNET = "10.77.0"
ORIGIN_IP = f"{SUBNET}.10"
MEMBER_IP = {m: f"{SUBNET}.{11 + i}" for i, m in enumerate(IDS)}
PORT = 9292
ADMIN = f"sha256:{hashlib.sha256(b'token-admin').hexdigest()}"
CLONE_NEWNET = 0x40000000

TOOLS = ("unshare", "nsenter", "ip", "tc", "curl")


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces and qdiscs need root"
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if missing:
        return f"needs {', '.join(missing)} (util-linux, iproute2, curl)"
    return None


@pytest.fixture(autouse=True)
def _namespaces_possible() -> None:
    """Skip with the reason where namespaces cannot be made, unless CI says this tier must
    run ($CACHED_TOOLS_REQUIRED, as .ci/run sets it): then fail."""
    why = _unavailable()
    if why is not None:
        if os.environ.get("CACHED_TOOLS_REQUIRED"):
            pytest.fail(f"the namespace tier is required here ($CACHED_TOOLS_REQUIRED): {why}")
        pytest.skip(why)


def run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{shlex.join(argv)}: {result.stderr.strip()}")
    return result.stdout


@dataclass
class Namespace:
    """A network namespace held by a ``sleep`` process (it ends with the process)."""

    name: str
    holder: subprocess.Popen[bytes]

    @property
    def path(self) -> str:
        return f"/proc/{self.holder.pid}/ns/net"

    def enter(self) -> list[str]:
        """The argv prefix that runs a command in this namespace."""
        return ["nsenter", f"--net={self.path}"]

    def run(self, *argv: str) -> str:
        return run(*self.enter(), *argv)

    def tx_bytes(self, dev: str) -> int:
        """Bytes sent on ``dev`` (this side of its link) so far."""
        (link,) = json.loads(self.run("ip", "-s", "-j", "link", "show", dev))
        return int(link["stats64"]["tx"]["bytes"])


def namespace(name: str) -> Namespace:
    holder = subprocess.Popen(
        ["unshare", "--net", "sleep", "600"], stdin=subprocess.DEVNULL, start_new_session=True
    )
    ns = Namespace(name, holder)
    # unshare execs sleep once the namespace exists: wait until it is no longer ours.
    ours = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and holder.poll() is None:
        if _ns_of(holder.pid) not in (None, ours):
            break
        time.sleep(0.01)
    assert _ns_of(holder.pid) not in (None, ours), f"{name}: unshare --net did not take"
    return ns


def _ns_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


@contextlib.contextmanager
def network() -> Iterator[dict[str, Namespace]]:
    """A hub with a bridge, and the origin's and every member's namespace linked to it:
    ``eth0`` inside each, ``h-<name>`` on the hub's side."""
    spaces: dict[str, Namespace] = {}
    try:
        for name in ("hub", "origin", *IDS):
            spaces[name] = namespace(name)
        hub = spaces["hub"]
        hub.run("ip", "link", "add", "br0", "type", "bridge")
        hub.run("ip", "link", "set", "br0", "up")
        addresses = {"origin": ORIGIN_IP, **MEMBER_IP}
        for name, address in addresses.items():
            side = f"h-{name}"
            ns = spaces[name]
            hub.run(
                "ip", "link", "add", side, "type", "veth", "peer", "name", "eth0",
                "netns", str(ns.holder.pid),
            )  # fmt: skip
            hub.run("ip", "link", "set", side, "master", "br0", "up")
            ns.run("ip", "link", "set", "lo", "up")
            ns.run("ip", "addr", "add", f"{address}/24", "dev", "eth0")
            ns.run("ip", "link", "set", "eth0", "up")
        yield spaces
    finally:
        for ns in spaces.values():
            ns.holder.kill()
            ns.holder.wait(10)


def shape(ns: Namespace, dev: str, rate: str | None) -> None:
    """Limit what ``ns`` sends on ``dev`` to ``rate`` (tc rate, e.g. ``200mbit``); None:
    unlimited again."""
    if rate is None:
        ns.run("tc", "qdisc", "del", "dev", dev, "root")
    else:
        ns.run(
            "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
            "rate", rate, "burst", "256kb", "latency", "400ms",
        )  # fmt: skip


def listening_socket_in(ns: Namespace, host: str, port: int) -> socket.socket:
    """A listening TCP socket of ``ns`` (setns on this thread while it is made)."""
    libc = ctypes.CDLL(None, use_errno=True)
    ours = os.open("/proc/self/ns/net", os.O_RDONLY)
    theirs = os.open(ns.path, os.O_RDONLY)
    try:
        if libc.setns(theirs, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns into the origin's namespace")
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
        finally:
            if libc.setns(ours, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(ours)
        os.close(theirs)
    return sock


@dataclass
class Member:
    id: str
    ns: Namespace
    proc: CachedProcess

    @property
    def url(self) -> str:
        return f"http://{MEMBER_IP[self.id]}:{PORT}"


@contextlib.asynccontextmanager
async def origin(ns: Namespace) -> AsyncIterator[FakeGlance]:
    glance = FakeGlance()
    for token, (project, roles) in TOKENS.items():
        glance.add_token(token, project, roles)
    await glance.start(sock=listening_socket_in(ns, ORIGIN_IP, PORT))
    try:
        yield glance
    finally:
        await glance.close()


@contextlib.asynccontextmanager
async def fleet(
    tmp_path: Path, spaces: dict[str, Namespace], glance: FakeGlance
) -> AsyncIterator[dict[str, Member]]:
    key = tmp_path / "fleet.key"
    key.write_bytes(os.urandom(48).hex().encode())
    key.chmod(0o600)
    base = cached_command()
    members: dict[str, Member] = {}
    env = dict(os.environ)
    try:
        for m in IDS:
            config = tmp_path / f"{m}.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "fleet_self": m,
                        "fleet_members": [
                            {"id": i, "url": f"http://{MEMBER_IP[i]}:{PORT}"} for i in IDS
                        ],
                        "fleet_secret_file": str(key),
                        "fleet_lookup_timeout": 2.0,  # a loaded 2-core test machine
                        "fleet_stall_timeout": 2.0,
                        "fleet_min_copy_rate": 0,  # the links are shaped here
                        # A routable listener needs management authentication.
                        "admin_tokens": [ADMIN],
                    }
                )
            )
            cache = tmp_path / f"cache-{m}"
            cache.mkdir()
            # The daemon's command enters the member's namespace (nsenter execs it).
            os.environ["CACHED_COMMAND"] = shlex.join([*spaces[m].enter(), *base])
            try:
                proc = CachedProcess(
                    f"http://{ORIGIN_IP}:{PORT}",
                    cache,
                    tmp_path / f"{m}.log",
                    "-c",
                    str(config),
                    "--listen",
                    f"{MEMBER_IP[m]}:{PORT}",  # the later --listen wins
                )
                members[m] = Member(m, spaces[m], proc)
                await asyncio.to_thread(proc.start)
            finally:
                os.environ.clear()
                os.environ.update(env)
        yield members
    finally:
        for member in members.values():
            await asyncio.to_thread(member.proc.stop)


@dataclass
class Fetched:
    status: int
    cache_status: str
    sha256: str


async def start_curl(
    member: Member, path: str, out: Path, token: str = "token-p1"
) -> asyncio.subprocess.Process:
    """A client in ``member``'s namespace starts a GET of ``path`` into ``out``."""
    argv = [
        *member.ns.enter(),
        "curl", "-sS", "--max-time", "60", "-o", str(out),
        "-w", "%{http_code} %header{cache-status}",
        "-H", f"X-Auth-Token: {token}", f"{member.url}{path}",
    ]  # fmt: skip
    return await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


async def finished(proc: asyncio.subprocess.Process, out: Path) -> Fetched:
    """What a client started by :func:`start_curl` got."""
    stdout, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    status, _, cache_status = stdout.decode().partition(" ")
    digest = await asyncio.to_thread(lambda: hashlib.sha256(out.read_bytes()).hexdigest())
    return Fetched(int(status), cache_status.strip(), digest)


async def curl(member: Member, path: str, out: Path, token: str = "token-p1") -> Fetched:
    """GET ``path`` from ``member`` by a client in the member's namespace."""
    return await finished(await start_curl(member, path, out, token), out)


def size_of(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def data_gets(glance: FakeGlance, image_id: str) -> list[str | None]:
    """Ranges of the upstream's data GETs of ``image_id``, authorisation probes left out."""
    return [r.range for r in glance.data_requests(image_id) if r.range != "bytes=0-0"]


async def test_peer_fill_over_shaped_links_and_a_partition(tmp_path: Path) -> None:
    """Over real links, the upstream's shaped to 200 Mbit/s: a cold image leaves the upstream
    once for the fleet (the owner's fetch, the others from its copy). Then the owner's link
    is slowed to 32 Mbit/s and, during a sibling's transfer from it, cut (``ip link set
    down`` on the hub's side): the sibling's fill hands over within the stall timeout and
    its client gets the right bytes; the rest comes from the upstream."""
    with network() as spaces:
        shape(spaces["origin"], "eth0", "200mbit")
        async with origin(spaces["origin"]) as glance, fleet(tmp_path, spaces, glance) as members:
            data = os.urandom(16 * MiB)
            want = hashlib.sha256(data).hexdigest()
            image = glance.add_image(data)
            owner = members[ring.owner(IDS, image.id)]
            others = [m for m in members.values() if m is not owner]
            path = f"/v2/images/{image.id}/file"

            # 1. Cold at the owner, then at both others: one upstream data GET.
            got = await curl(owner, path, tmp_path / "owner.bin")
            assert (got.status, got.sha256) == (200, want), got
            for member in others:
                got = await curl(member, path, tmp_path / f"{member.id}.bin")
                assert (got.status, got.sha256) == (200, want), got
            assert data_gets(glance, image.id) == [None]

            # 2. A second image held by the owner; its link slowed, then cut mid-transfer.
            data2 = os.urandom(16 * MiB)
            want2 = hashlib.sha256(data2).hexdigest()
            image2 = glance.add_image(data2)
            holder = members[ring.owner(IDS, image2.id)]
            path2 = f"/v2/images/{image2.id}/file"
            got = await curl(holder, path2, tmp_path / "holder2.bin")
            assert (got.status, got.sha256) == (200, want2), got
            assert data_gets(glance, image2.id) == [None]

            taker = next(m for m in members.values() if m is not holder)
            shape(holder.ns, "eth0", "32mbit")  # about 4 MB/s: 16 MiB takes ~4 s
            sent_before = holder.ns.tx_bytes("eth0")
            fetch = asyncio.create_task(curl(taker, path2, tmp_path / "taker2.bin"))
            await until(
                lambda: holder.ns.tx_bytes("eth0") - sent_before >= 4 * MiB,
                "4 MiB went from the holder to its sibling",
                within=30,
            )
            spaces["hub"].run("ip", "link", "set", f"h-{holder.id}", "down")
            loop = asyncio.get_running_loop()
            cut_at = loop.time()
            got = await asyncio.wait_for(fetch, 60)
            print(f"partition: client done {loop.time() - cut_at:.2f} s after the cut")
            assert (got.status, got.sha256) == (200, want2), got

            ranges = data_gets(glance, image2.id)
            print(f"partition: upstream data GETs {ranges}")
            # The holder's fetch, then the rest, from a byte past the first 4 MiB.
            assert ranges[0] is None and len(ranges) == 2, ranges
            assert ranges[1] is not None
            resumed = int(ranges[1].removeprefix("bytes=").split("-")[0])
            assert resumed >= 3 * MiB, ranges  # some of the holder's bytes were kept

            # The link back: the holder's copy is still whole, a hit.
            spaces["hub"].run("ip", "link", "set", f"h-{holder.id}", "up")
            shape(holder.ns, "eth0", None)
            got = await curl(holder, path2, tmp_path / "holder2-again.bin")
            assert (got.status, got.sha256) == (200, want2), got
            assert got.cache_status.startswith("cached") and "hit" in got.cache_status, got


async def test_a_partition_while_following_a_sibling_fill(tmp_path: Path) -> None:
    """The owner's fill runs, fed by the upstream over a 64 Mbit/s link; a second member's
    client asks for the image and the member follows that running fill (``filling;
    source=upstream``). Once 4 MiB reached that client, the owner's link goes down (its own
    fill stops with it): after the stall timeout the follower takes the rest from the
    upstream, where it was; its client's body is the image."""
    with network() as spaces:
        shape(spaces["origin"], "eth0", "64mbit")  # about 8 MB/s: 16 MiB takes ~2 s
        async with origin(spaces["origin"]) as glance, fleet(tmp_path, spaces, glance) as members:
            data = os.urandom(16 * MiB)
            want = hashlib.sha256(data).hexdigest()
            image = glance.add_image(data)
            order = ring.order(IDS, image.id)
            owner, follower = members[order[0]], members[order[1]]
            path = f"/v2/images/{image.id}/file"

            first = await start_curl(owner, path, tmp_path / "owner.bin")
            await until(lambda: size_of(tmp_path / "owner.bin") > 0, "the owner's fill runs")
            body = tmp_path / "follower.bin"
            second = await start_curl(follower, path, body)
            await until(lambda: size_of(body) >= 4 * MiB, "4 MiB reached the follower's client")
            spaces["hub"].run("ip", "link", "set", f"h-{owner.id}", "down")
            loop = asyncio.get_running_loop()
            cut_at, had = loop.time(), size_of(body)
            got = await asyncio.wait_for(finished(second, body), 60)
            assert (got.status, got.sha256) == (200, want), got
            ranges = data_gets(glance, image.id)
            print(
                f"following: {had / MiB:.1f} MiB at the client when cut; done "
                f"{loop.time() - cut_at:.2f} s after; upstream data GETs {ranges}"
            )
            # The owner's fetch, then the follower's rest from where it was.
            assert ranges[0] is None and len(ranges) == 2, ranges
            assert ranges[1] is not None
            assert int(ranges[1].removeprefix("bytes=").split("-")[0]) >= 3 * MiB, ranges
            first.kill()  # the owner's own client waits on its cut-off fill
            await first.wait()
