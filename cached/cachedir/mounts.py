"""What a declared directory is right now: its mount, and whether it answers.

Owns nothing shared: these are pure parsers and one blocking probe. :func:`probe` touches the
directory (stat, xattr read, and for a writable directory a probe file), so it can block for
as long as a hung share does: call it only from a guard's own probe thread
(:class:`cached.cachedir.guard.Guard`), never from the event loop or the default executor.

States (Glance has no words for these; they are ours):

- ``ok``: the directory is the filesystem it should be and answered every step;
- ``read_only``: a directory that must be writable is on a read-only mount;
- ``vanished``: not there, not mounted although it must be, another filesystem type than
  declared, or no longer the mount it was at start;
- ``hung``: the probe did not return within its timeout (decided by the guard);
- ``failing``: the filesystem answered with an error (``EIO``, ``ESTALE``, ``EACCES``,
  ``ENOTSUP`` on xattrs, a dead FUSE/NFS transport).
"""

from __future__ import annotations

import enum
import errno
import os
from dataclasses import dataclass
from pathlib import Path

import xattr

MOUNTINFO = "/proc/self/mountinfo"
# Name of the file a writable directory's probe creates, writes, flushes and removes.
PROBE_NAME = ".cached-probe"
_PROBE_XATTR = "user.cached.probe"
# Set on the cache directory itself when its index is built: a filesystem mounted back
# (or a fresh one that got the same device number and mount id) is told apart by it.
VOLUME_XATTR = "user.cached.volume"


class State(enum.Enum):
    OK = "ok"
    READ_ONLY = "read_only"
    VANISHED = "vanished"
    HUNG = "hung"
    FAILING = "failing"


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo`` (proc(5))."""

    mount_id: int
    device: str  # "major:minor"
    mount_point: str
    options: frozenset[str]  # per-mount options (ro/rw, nosuid, ...)
    fstype: str
    source: str

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \ooo octal escapes.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts listed in the text of a ``mountinfo`` file, in its order (later ones stack
    on top of earlier ones at the same mount point)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 6 or len(fields) < sep + 3:
            continue
        mounts.append(
            Mount(
                mount_id=int(fields[0]),
                device=fields[2],
                mount_point=_unescape(fields[4]),
                options=frozenset(fields[5].split(",")),
                fstype=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
            )
        )
    return mounts


def read_mounts(path: str = MOUNTINFO) -> list[Mount]:
    """This process's mount table (blocking, but procfs never hangs)."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount ``path`` (absolute, normalised) lies on: the longest mount point containing
    it, the last one listed where several are stacked on the same point."""
    best: Mount | None = None
    for mount in mounts:
        point = mount.mount_point
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best.mount_point)):
            best = mount
    return best


def is_mount_point(path: str | os.PathLike[str], mounts: list[Mount] | None = None) -> bool:
    """Whether ``path`` is itself a mount point (from the mount table only: never blocks on
    the filesystem, unlike ``os.path.ismount``)."""
    where = os.path.normpath(os.path.abspath(path))
    mount = mount_of(where, read_mounts() if mounts is None else mounts)
    return mount is not None and mount.mount_point == where


def classify(exc: BaseException) -> State | None:
    """The state an error from a directory's filesystem puts it in; None: not such an error
    (out of space, a bad argument: the filesystem itself answered)."""
    code = getattr(exc, "errno", None)  # an OSError, or a domain error that kept its errno
    if not isinstance(code, int):
        return None
    if code in (errno.ENOENT, errno.ENOTDIR):
        return State.VANISHED
    if code == errno.EROFS:
        return State.READ_ONLY
    if code in (
        errno.EIO,
        errno.ESTALE,
        errno.EACCES,
        errno.EPERM,
        errno.ENOTSUP,
        errno.EOPNOTSUPP,
        errno.ENOTCONN,  # a FUSE daemon (or sshfs) that went away
        errno.ETIMEDOUT,  # an NFS soft mount giving up
        errno.EHOSTDOWN,
        errno.EREMOTEIO,
        errno.ENODEV,
    ):
        return State.FAILING
    return None


@dataclass(frozen=True)
class Identity:
    """Which filesystem the directory was on when it was last ``ok``."""

    mount_id: int
    st_dev: int
    mounted: bool  # the directory is itself a mount point
    volume: bytes | None = None  # the directory's VOLUME_XATTR, if set


# Filesystems whose reads can block for as long as a server does not answer (a hard NFS
# mount waits forever): a hit from one is never sent from the event loop
# (cached/download/reader.py).
SHARE_FSTYPES = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p", "lustre", "gpfs", "afs"}
)


def is_share(fstype: str) -> bool:
    """Whether ``fstype`` (as the mount table names it) is a network or FUSE filesystem."""
    return fstype in SHARE_FSTYPES or fstype == "fuse" or fstype.startswith(("fuse.", "fuseblk"))


@dataclass(frozen=True)
class Verdict:
    """The outcome of one probe."""

    state: State
    reason: str
    identity: Identity | None = None
    fstype: str = ""  # the filesystem type it is on, when the probe got that far


@dataclass(frozen=True)
class ProbeSpec:
    """What a directory must be (see ``image_cache_mount``/``upstream_mount`` in config)."""

    require_mount: bool = False
    fstype: str = ""
    writable: bool = False
    needs_xattrs: bool = False


class Steps:
    """The step a running probe is in, read by the guard when the probe does not return."""

    def __init__(self) -> None:
        self.current = "starting"


def probe(
    directory: Path, spec: ProbeSpec, baseline: Identity | None, steps: Steps | None = None
) -> Verdict:
    """Decide the state of ``directory`` (blocking; see the module docstring).

    Args:
        directory: absolute path of the declared directory.
        spec: what it must be.
        baseline: the identity it had when last ``ok`` (None: never ok yet). A directory that
            was a mount point counts as vanished once it is not one any more.
        steps: updated with the step in progress, for a probe that hangs.
    """
    steps = steps or Steps()
    where = os.path.normpath(os.path.abspath(directory))
    steps.current = "reading the mount table"
    mount = mount_of(where, read_mounts())
    if mount is None:  # only in a chroot without / in the table
        return Verdict(State.VANISHED, f"{where} is on no mount listed in {MOUNTINFO}")
    mounted = mount.mount_point == where
    if not mounted and spec.require_mount:
        return Verdict(
            State.VANISHED,
            f"{where} is not a mount point (it is a plain directory on {mount.mount_point}, "
            f"{mount.fstype}); require_mount is set",
        )
    if not mounted and baseline is not None and baseline.mounted:
        return Verdict(
            State.VANISHED,
            f"{where} is no longer a mount point (it was mount {baseline.mount_id}; now a "
            f"plain directory on {mount.mount_point})",
        )
    if spec.fstype and mount.fstype != spec.fstype:
        return Verdict(
            State.VANISHED,
            f"{where} is on {mount.fstype} ({mount.source}), expected fstype {spec.fstype}",
        )
    try:
        steps.current = "stat"
        st = os.stat(where)
        if baseline is not None and not baseline.mounted and st.st_dev != baseline.st_dev:
            return Verdict(
                State.VANISHED,
                f"{where} is on another filesystem than at start (device {st.st_dev:#x}, "
                f"was {baseline.st_dev:#x})",
            )
        if spec.writable:
            steps.current = "statvfs"
            if mount.read_only or os.statvfs(where).f_flag & os.ST_RDONLY:
                volume = _read_volume(where, spec)
                identity = Identity(mount.mount_id, st.st_dev, mounted, volume)
                return Verdict(
                    State.READ_ONLY, f"{where} is mounted read-only", identity, mount.fstype
                )
        steps.current = "xattr read"
        identity = Identity(mount.mount_id, st.st_dev, mounted, _read_volume(where, spec))
        if spec.writable:
            steps.current = "probe file write"
            _write_probe(where, spec.needs_xattrs)
    except OSError as exc:
        state = classify(exc) or State.FAILING
        what = exc.strerror or str(exc)
        return Verdict(state, f"{where}: {steps.current} failed: {what}")
    return Verdict(
        State.OK,
        f"{where} answers ({mount.fstype}, mount {mount.mount_id})",
        identity,
        mount.fstype,
    )


def _read_volume(path: str, spec: ProbeSpec) -> bytes | None:
    try:
        return bytes(xattr.getxattr(path, VOLUME_XATTR))
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None  # answered: the attribute is simply not set
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) and not spec.needs_xattrs:
            return None  # a store that needs no xattrs (many NFS servers have none)
        raise


def mark_volume(path: str | os.PathLike[str]) -> bytes:
    """The directory's volume mark, set now if it has none (blocking: an I/O executor)."""
    try:
        return bytes(xattr.getxattr(os.fspath(path), VOLUME_XATTR))
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise
    mark = os.urandom(8).hex().encode()
    xattr.setxattr(os.fspath(path), VOLUME_XATTR, mark)
    return mark


def _write_probe(directory: str, with_xattr: bool) -> None:
    """Create, write, flush and remove a probe file; full is not a fault of the mount.

    The file is an unnamed ``O_TMPFILE`` where the filesystem has them (ext4, xfs, tmpfs):
    nothing ever shows up in the directory. Elsewhere (NFS) it is ``.cached-probe``.
    """
    path = None
    try:
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            path = os.path.join(directory, PROBE_NAME)
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return
        raise
    try:
        try:
            os.write(fd, b"cached probe\n")
            if with_xattr:
                xattr.setxattr(fd, _PROBE_XATTR, b"1")
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
    finally:
        os.close(fd)
        if path is not None:
            os.unlink(path)


__all__ = [
    "SHARE_FSTYPES",
    "Identity",
    "Mount",
    "ProbeSpec",
    "State",
    "Steps",
    "Verdict",
    "classify",
    "is_mount_point",
    "is_share",
    "mark_volume",
    "mount_of",
    "parse_mountinfo",
    "probe",
    "read_mounts",
]
