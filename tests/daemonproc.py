"""``cached`` as a real subprocess: start it, find its port, signal it, read its log.

The methods block (they poll the log file and wait for the process): from an async test call
them through ``asyncio.to_thread`` so the fake upstream in the test's loop keeps answering.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

LISTEN_RE = re.compile(r"listening on (https?://\S+)")
ADMIN_RE = re.compile(r"management API on (\S+)")


def cached_command() -> list[str]:
    """How to run ``cached``: ``$CACHED_COMMAND`` (split like a shell would) if set, else the
    console script of this interpreter, else ``python -m cached.cli``."""
    if os.environ.get("CACHED_COMMAND"):
        return shlex.split(os.environ["CACHED_COMMAND"])
    script = Path(sys.executable).with_name("cached")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "cached.cli"]


def run_cached(
    *args: str, cwd: Path | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run a ``cached`` command that ends by itself (``check-config``, a failing ``serve``)."""
    return subprocess.run(
        [*cached_command(), *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


class CachedProcess:
    """``cached serve --listen 127.0.0.1:0`` in front of ``upstream``, logging to ``log``.

    Args:
        upstream: ``http://...`` or ``file:///dir``.
        cache_dir: the cache directory.
        log: file that receives the daemon's stdout and stderr (appended across restarts).
        extra: more ``cached serve`` arguments.
        env: variables added to the environment (``NOTIFY_SOCKET``, ...).
    """

    def __init__(
        self,
        upstream: str,
        cache_dir: Path,
        log: Path,
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.upstream = upstream
        self.env = env  # added to this process's environment
        self.cache_dir = cache_dir
        self.log = log
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.admin_url = ""  # the management listener, if configured (unix:/path or a URL)
        self._log_offset = 0

    def start(self, timeout: float = 30.0) -> str:
        """Start the daemon; return its URL once it logged ``listening on``."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._log_offset = self.log.stat().st_size if self.log.exists() else 0
        cmd = [
            *cached_command(),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            self.upstream,
            "--cache-dir",
            str(self.cache_dir),
            *self.extra,
        ]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env} if self.env else None,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            output = self.output()
            match = LISTEN_RE.search(output)
            if match:
                self.url = match[1]
                admin = ADMIN_RE.search(output)  # logged before "listening on"
                self.admin_url = admin[1] if admin else ""
                return self.url
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.kill()
        raise AssertionError(f"{' '.join(cmd)} never said 'listening on':\n{self.output()}")

    def output(self) -> str:
        """What the current run logged so far."""
        with self.log.open("rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """The exit code; raises ``subprocess.TimeoutExpired`` if it runs on."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """``kill -9`` and reap (a no-op if it already ended)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not end in ``timeout``. Returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.wait(10)
