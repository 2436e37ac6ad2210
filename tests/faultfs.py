"""A FUSE filesystem for fault tests: passes every call through to a backing directory, and
can be switched, while mounted, to answer ``EIO`` or ``ESTALE`` or to block like a hard NFS
mount whose server stopped answering.

Run as its own process (``python tests/faultfs.py BACKING MOUNTPOINT CONTROL``); the mode is
the first word of the file ``CONTROL`` (``ok``, ``eio``, ``estale``, ``block``), read on
every call, so a test switches it by rewriting that file (:class:`FaultFS` does). A blocked
call waits until the mode is something else, then carries on with that mode.

The test helper :class:`FaultFS` mounts it (root and ``/dev/fuse`` needed; libfuse 2 through
``fusepy``), switches it, and unmounts it.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODES = ("ok", "eio", "estale", "block")


def _serve(backing: str, mountpoint: str, control: str) -> None:
    from fuse import FUSE, FuseOSError, Operations  # the test extra; only in this process

    def mode() -> str:
        try:
            with open(control) as f:
                return (f.read().split() or ["ok"])[0]
        except FileNotFoundError:
            return "ok"

    def gate() -> None:
        current = mode()
        while current == "block":
            time.sleep(0.02)
            current = mode()
        if current == "eio":
            raise FuseOSError(errno.EIO)
        if current == "estale":
            raise FuseOSError(errno.ESTALE)

    def real(path: str) -> str:
        return os.path.join(backing, path.lstrip("/"))

    def call(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except OSError as exc:
            raise FuseOSError(exc.errno or errno.EIO) from None

    class Passthrough(Operations):  # type: ignore[misc]
        def __call__(self, op: str, *args: Any) -> Any:
            if op not in ("init", "destroy", "release", "releasedir"):
                gate()
            return super().__call__(op, *args)

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            st = call(os.lstat, real(path)) if fh is None else call(os.fstat, fh)
            keys = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime")
            out = {k: getattr(st, k) for k in keys}
            out.update(st_mtime=st.st_mtime, st_ctime=st.st_ctime, st_ino=st.st_ino)
            return out

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *call(os.listdir, real(path))]

        def access(self, path: str, amode: int) -> None:
            if not os.access(real(path), amode):
                raise FuseOSError(errno.EACCES)

        def statfs(self, path: str) -> dict[str, Any]:
            sv = call(os.statvfs, real(path))
            keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree")
            out = {k: getattr(sv, k) for k in keys}
            out.update(f_files=sv.f_files, f_flag=sv.f_flag, f_frsize=sv.f_frsize)
            out["f_namemax"] = sv.f_namemax
            return out

        def mkdir(self, path: str, mode: int) -> None:
            call(os.mkdir, real(path), mode)

        def rmdir(self, path: str) -> None:
            call(os.rmdir, real(path))

        def unlink(self, path: str) -> None:
            call(os.unlink, real(path))

        def rename(self, old: str, new: str) -> None:
            call(os.rename, real(old), real(new))

        def chmod(self, path: str, mode: int) -> None:
            call(os.chmod, real(path), mode)

        def chown(self, path: str, uid: int, gid: int) -> None:
            call(os.chown, real(path), uid, gid)

        def utimens(self, path: str, times: tuple[float, float] | None = None) -> None:
            call(os.utime, real(path), times)

        def truncate(self, path: str, length: int, fh: int | None = None) -> None:
            call(os.truncate, real(path) if fh is None else fh, length)

        def open(self, path: str, flags: int) -> int:
            return int(call(os.open, real(path), flags))

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            return int(call(os.open, real(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode))

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return bytes(call(os.pread, fh, size, offset))

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            return int(call(os.pwrite, fh, data, offset))

        def flush(self, path: str, fh: int) -> None:
            return None

        def fsync(self, path: str, datasync: int, fh: int) -> None:
            call(os.fdatasync if datasync else os.fsync, fh)

        def release(self, path: str, fh: int) -> None:
            os.close(fh)

        def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
            return bytes(call(os.getxattr, real(path), name))

        def setxattr(
            self, path: str, name: str, value: bytes, options: int, position: int = 0
        ) -> None:
            call(os.setxattr, real(path), name, value, options)

        def listxattr(self, path: str) -> list[str]:
            return list(call(os.listxattr, real(path)))

        def removexattr(self, path: str, name: str) -> None:
            call(os.removexattr, real(path), name)

    # No kernel caching of attributes or names: every call reaches this process, as every
    # call to an NFS server whose attributes expired would.
    FUSE(
        Passthrough(),
        mountpoint,
        foreground=True,
        nothreads=False,
        allow_other=True,
        attr_timeout=0,
        entry_timeout=0,
        negative_timeout=0,
        fsname="faultfs",
        subtype="faultfs",
    )


class FaultFS:
    """A mounted :mod:`faultfs` (a subprocess) over ``backing`` at ``mountpoint``."""

    def __init__(self, backing: Path, mountpoint: Path, control: Path):
        self.backing, self.mountpoint, self.control = backing, mountpoint, control
        self.proc: subprocess.Popen[bytes] | None = None

    def mount(self, timeout: float = 15.0) -> None:
        self.set("ok")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(self.backing), str(self.mountpoint), str(self.control)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.ismount(self.mountpoint):
                return
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"faultfs did not mount: {err}")
            time.sleep(0.02)
        self.unmount()
        raise RuntimeError("faultfs did not mount in time")

    def set(self, mode: str) -> None:
        """Switch the mode (``ok``, ``eio``, ``estale``, ``block``) for every following call."""
        assert mode in MODES, mode
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(mode + "\n")
        os.replace(tmp, self.control)

    def unmount(self) -> None:
        self.set("ok")  # blocked calls return, so the unmount does not wait on them
        subprocess.run(["umount", "-l", str(self.mountpoint)], check=False, capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


if __name__ == "__main__":
    _serve(*sys.argv[1:4])
