"""Processes the bench starts: one registry, so every one of them is stopped on any exit.

Each server runs in its own session (so a terminal Ctrl-C reaches only the bench, which then
stops them in order) and is stopped by its own pid: SIGTERM, then SIGKILL to its process group.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

_LISTEN_RE = re.compile(r"listening on https?://([\w.\-\[\]:]+):(\d+)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port}") from exc
            time.sleep(0.02)


class Proc:
    """One server process; its stdout+stderr go to ``log`` (a line watcher finds its port)."""

    def __init__(
        self, name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.listen_port: int | None = None
        self.listen_at: float | None = None  # time.monotonic() when the listening line arrived
        self._listening = threading.Event()
        self.started_at = time.monotonic()
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        REGISTRY.append(self)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        with open(self.log, "ab") as out:
            for line in self.popen.stdout:
                if not self._listening.is_set():
                    m = _LISTEN_RE.search(line.decode(errors="replace"))
                    if m:
                        self.listen_at = time.monotonic()
                        self.listen_port = int(m.group(2))
                        self._listening.set()
                out.write(line)
                out.flush()

    def wait_listening(self, timeout: float = 30.0) -> int:
        """Wait for a ``listening on http(s)://HOST:PORT`` line; return PORT."""
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.05):
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}): {self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not report listening: {self.tail()}")
        assert self.listen_port is not None
        return self.listen_port

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop this process by its pid; SIGKILL its own process group if it lingers."""
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, sig)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)  # the session/group we created for it
        except (ProcessLookupError, PermissionError):
            pass
        if self.popen.poll() is None:
            self.popen.wait(5)
        self._reader.join(2)
        if self in REGISTRY:
            REGISTRY.remove(self)

    def __repr__(self) -> str:
        return f"<{self.name} pid={self.pid} {shlex.join(self.argv)}>"


REGISTRY: list[Proc] = []


def stop_all() -> None:
    """Stop every process still registered, newest first."""
    for proc in reversed(list(REGISTRY)):
        try:
            proc.stop()
        except Exception as exc:  # noqa: BLE001 - cleanup must go on
            print(f"bench: could not stop {proc}: {exc}")


def install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into SystemExit so ``finally: stop_all()`` runs."""

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGHUP, _exit)
