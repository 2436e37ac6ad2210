"""A service manager for one unit, for machines without systemd as PID 1 (CI containers):
the ``systemctl`` the install test puts first in ``PATH`` while it runs the README's recipe.

It does for ``systemd/cached.service`` what systemd does on start, from the unit file the
recipe installed (``/etc/systemd/system/NAME``): ``RuntimeDirectory=`` and
``StateDirectory=`` (owned by ``User=``, with their ``...Mode=``), each ``ExecStartPre=``
then ``ExecStart=`` as ``User=``/``Group=`` (``setpriv``) with ``UMask=`` and a clean
environment, ``Type=notify``: the service is
*active* once the main process sent ``READY=1`` to ``$NOTIFY_SOCKET`` (a datagram socket at an
abstract address, read by a manager process that stays with the service), *failed* if a
command fails or the main process ends before, or no ``READY=1`` within ``TimeoutStartSec=``.
``stop`` sends ``SIGTERM`` and waits ``TimeoutStopSec=``. Sandboxing options are not
reproduced (``systemd-analyze verify`` checks the unit: tests/test_ops.py).

Usage: ``unitrun.py STATE_DIR systemctl-arguments...`` with ``daemon-reload``,
``enable [--now] UNIT``, ``start UNIT``, ``stop UNIT``, ``status UNIT``, ``is-active UNIT``.
The state (``STATE_DIR/UNIT.json``) is written by the manager process only; the commands read
it. The service's output goes to ``STATE_DIR/UNIT.log`` (its journal). Standard library only:
it runs under the system's ``python3``.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

UNIT_DIR = Path("/etc/systemd/system")
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def parse_unit(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of the unit (every section), values in order per key."""
    values: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        values.setdefault(key.strip(), []).append(value.strip())
    return values


def seconds(text: str) -> float:
    text = text.strip()
    if text.endswith("min"):
        return float(text[:-3]) * 60
    if text.endswith("s"):
        return float(text[:-1])
    return float(text)


class Unit:
    def __init__(self, state_dir: Path, name: str) -> None:
        self.name = name if name.endswith(".service") else name + ".service"
        self.path = UNIT_DIR / self.name
        self.state_file = state_dir / f"{self.name}.json"
        self.log = state_dir / f"{self.name}.log"
        self.state_dir = state_dir

    def config(self) -> dict[str, list[str]]:
        if not self.path.is_file():
            raise SystemExit(f"Unit {self.name} not found.")
        return parse_unit(self.path)

    def state(self) -> dict[str, object]:
        try:
            return dict(json.loads(self.state_file.read_text()))
        except (OSError, ValueError):
            return {"state": "inactive"}

    def write_state(self, **values: object) -> None:
        state = self.state() | values
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_file)


def _as_user(unit: dict[str, list[str]], argv: list[str]) -> list[str]:
    user = unit.get("User", [""])[-1]
    if not user:
        return argv
    group = unit.get("Group", [user])[-1]
    return ["setpriv", f"--reuid={user}", f"--regid={group}", "--init-groups", *argv]


def manage(unit: Unit) -> int:
    """The manager process: start the service, follow its notifications, stop it."""
    config = unit.config()
    umask = int(config.get("UMask", ["0022"])[-1], 8)
    user = config.get("User", [""])[-1]
    for kind, base in (("Runtime", "/run"), ("State", "/var/lib")):
        for name in config.get(f"{kind}Directory", []):
            path = Path(base) / name
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(int(config.get(f"{kind}DirectoryMode", ["0755"])[-1], 8))
            if user:
                entry = pwd.getpwnam(user)
                os.chown(path, entry.pw_uid, entry.pw_gid)
    env = {"PATH": CLEAN_PATH, "LANG": "C.UTF-8"}
    out = unit.log.open("ab")

    def run_pre(command: str) -> int:
        argv = _as_user(config, shlex.split(command.lstrip("-@+!")))
        res = subprocess.run(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                             preexec_fn=lambda: os.umask(umask), check=False)  # fmt: skip
        return res.returncode

    for command in config.get("ExecStartPre", []):
        status = run_pre(command)
        if status != 0:
            unit.write_state(state="failed", result=f"ExecStartPre exited {status}")
            return 1
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = f"unitrun-{os.getpid()}"
    notify.bind("\0" + address)
    argv = _as_user(config, shlex.split(config["ExecStart"][-1]))
    main = subprocess.Popen(
        argv,
        env={**env, "NOTIFY_SOCKET": "@" + address},
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: os.umask(umask),
    )
    unit.write_state(state="activating", pid=main.pid, status="")
    stopping = False

    def on_term(*_: object) -> None:
        nonlocal stopping
        stopping = True
        if main.poll() is None:
            main.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    start_deadline = time.monotonic() + seconds(config.get("TimeoutStartSec", ["90"])[-1])
    notify.settimeout(0.1)
    active = False
    while main.poll() is None:
        if not active and time.monotonic() > start_deadline:
            main.kill()
            unit.write_state(state="failed", result="start timed out (no READY=1)")
            return 1
        try:
            data = notify.recv(4096)
        except (TimeoutError, InterruptedError):
            continue
        fields = dict(x.split("=", 1) for x in data.decode().splitlines() if "=" in x)
        if fields.get("READY") == "1":
            active = True
            unit.write_state(state="active")
        if fields.get("STOPPING") == "1":
            unit.write_state(state="deactivating")
        if "STATUS" in fields:
            unit.write_state(status=fields["STATUS"])
    status = main.wait()
    ok = status == 0 or (stopping and status == -signal.SIGTERM)  # as systemd judges it
    unit.write_state(
        state="inactive" if ok else "failed", result=f"main process exited {status}", pid=0
    )
    return 0


def start(unit: Unit) -> int:
    config = unit.config()
    if unit.state().get("state") in ("active", "activating"):
        return 0
    unit.write_state(state="activating", result="", pid=0)
    subprocess.Popen(
        [sys.executable, __file__, str(unit.state_dir), "__manage", unit.name],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + seconds(config.get("TimeoutStartSec", ["90"])[-1]) + 5
    while time.monotonic() < deadline:
        state = unit.state()
        if state["state"] == "active":
            return 0
        if state["state"] == "failed":
            break
        time.sleep(0.05)
    print(f"Job for {unit.name} failed: {unit.state().get('result')}", file=sys.stderr)
    print(f"See its log: {unit.log}", file=sys.stderr)
    return 1


def stop(unit: Unit) -> int:
    config = unit.config()
    state = unit.state()
    pid = int(str(state.get("pid") or 0))
    if state.get("state") not in ("active", "activating") or not pid:
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + seconds(config.get("TimeoutStopSec", ["90"])[-1])
    while unit.state().get("state") in ("active", "activating", "deactivating"):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return 1
        time.sleep(0.05)
    return 0


def status(unit: Unit) -> int:
    config = unit.config()
    state = unit.state()
    wants = UNIT_DIR / "multi-user.target.wants" / unit.name
    enabled = "enabled" if wants.is_symlink() else "disabled"
    print(f"* {unit.name} - {config.get('Description', [''])[-1]}")
    print(f"     Loaded: loaded ({unit.path}; {enabled})")
    running = " (running)" if state["state"] == "active" else ""
    print(f"     Active: {state['state']}{running}")
    if state.get("pid"):
        print(f"   Main PID: {state['pid']}")
    if state.get("status"):
        print(f'     Status: "{state["status"]}"')
    if state.get("result"):
        print(f"     Result: {state['result']}")
    return 0 if state["state"] == "active" else 3


def main(argv: list[str]) -> int:
    state_dir = Path(argv[0])
    state_dir.mkdir(parents=True, exist_ok=True)
    args = argv[1:]
    if not args:
        raise SystemExit("unitrun: no command")
    command, rest = args[0], [a for a in args[1:] if not a.startswith("-")]
    if command == "daemon-reload":
        return 0
    if command == "__manage":
        return manage(Unit(state_dir, rest[0]))
    if not rest:
        raise SystemExit(f"unitrun: {command}: which unit?")
    unit = Unit(state_dir, rest[0])
    if command == "enable":
        unit.config()
        wants = UNIT_DIR / "multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        link = wants / unit.name
        if not link.is_symlink():
            link.symlink_to(unit.path)
        return start(unit) if "--now" in args else 0
    if command == "start":
        return start(unit)
    if command == "stop":
        return stop(unit)
    if command == "status":
        return status(unit)
    if command == "is-active":
        state = str(unit.state()["state"])
        print(state)
        return 0 if state == "active" else 3
    raise SystemExit(f"unitrun: unknown command {command!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
