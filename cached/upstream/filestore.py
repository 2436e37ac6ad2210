"""The ``file`` backend: a directory laid out like Glance's filesystem store (``<dir>/<id>``).

There is no identity service behind it: it accepts everyone (the daemon then listens on
loopback only) or the tokens listed in ``access_tokens``. It only fetches: records (as Glance
would show them), authorisation answers, image bytes at any offset; the image API that
clients call around a download is emulated on top of it by ``cached/edge/fileapi.py``.

Errors are classified here: a missing image file is Glance's 404; any other ``OSError`` of the
image directory (an NFS store that fails, a file that cannot be read) is
:class:`UpstreamUnavailable`, never an error of the cache directory. Every filesystem call
runs in a worker thread (the store guard's own, when there is one); the backend keeps no
state that changes after construction.

With a guard (a :class:`DirectoryGuard`: the composition root hands in the mount guard of
``upstream_mount``, cached/cachedir/guard.py; this backend knows only what it asks of it), a store
directory that is not
``ok`` answers 503 with Glance's JSON error page naming the state, for downloads, records and
lists: a missing share is never "no image found", which Nova would take for a deleted image.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import json
import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cached.errors import UpstreamError, UpstreamUnavailable
from cached.ids import is_image_id
from cached.upstream import (
    Authorization,
    Buffer,
    Credentials,
    Decision,
    ImageRecord,
    pages,
)

log = logging.getLogger(__name__)


T = TypeVar("T")
_Io = Callable[..., Awaitable[Any]]


class DirectoryGuard(Protocol):
    """What the backend asks of the guard of its directory: whether it is usable (and its
    state's name, for the 503), to run its I/O on the guard's own threads, and to look at
    once after an error."""

    @property
    def ok(self) -> bool: ...

    @property
    def state(self) -> Enum: ...

    @property
    def probe_interval(self) -> float: ...

    def report(self, exc: BaseException) -> None: ...

    async def run_io(self, fn: Callable[..., T], *args: Any) -> T: ...

    async def check(self) -> Any: ...


def _unavailable(guard: DirectoryGuard) -> UpstreamError:
    """Glance's JSON error page (webob's, ``Accept: application/json``) for a store directory
    that is not ok. It names the state; the reason (paths) goes to the log only."""
    message = (
        f"The image store is unavailable: its directory is {guard.state.value}. Try again later."
    )
    body = {"message": message, "code": "503 Service Unavailable", "title": "Service Unavailable"}
    retry = max(1, round(guard.probe_interval))
    return UpstreamError(
        503,
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "Retry-After": str(retry)},
    )


async def _to_thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)


def _not_found(image_id: str) -> UpstreamError:
    return glance_error(404, "Not Found", f"No image found with ID {image_id}")


class PageError(UpstreamError):
    """An error the file store answers itself, as Glance would: its plain text page by
    default; :meth:`shaped` gives the page for a caller's ``Accept``."""

    def __init__(self, status: int, message: str, detail: str = ""):
        page = pages.render(status, message, None, detail)
        super().__init__(status, page.body, {"Content-Type": page.content_type})
        self.message = message
        self.detail = detail

    def shaped(self, accept: str | None) -> tuple[bytes, dict[str, str]]:
        """The body and headers for a caller whose ``Accept`` is ``accept``."""
        page = pages.render(self.status, self.message, accept, self.detail)
        return page.body, {**self.headers, "Content-Type": page.content_type}


def glance_error(status: int, title: str, detail: str) -> PageError:
    """Glance's error page (webob's; ``title``: the status's reason phrase) as the file
    store's answer."""
    del title  # the reason phrase of ``status``
    return PageError(status, detail)


def shaped(err: UpstreamError, accept: str | None) -> tuple[bytes, dict[str, str]]:
    """``err``'s body and headers for a caller whose ``Accept`` is ``accept``."""
    if isinstance(err, PageError):
        return err.shaped(accept)
    return err.body, dict(err.headers)


def _unreadable(image_id: str, exc: OSError) -> UpstreamUnavailable:
    """The error for an image store that failed us (anything but a missing image)."""
    return UpstreamUnavailable(f"image store: cannot read image {image_id}: {exc}")


class FileStream:
    """Bytes ``[start, end)`` of an open image file, read in a worker thread."""

    def __init__(self, image_id: str, fd: int, start: int, end: int, io: _Io = _to_thread):
        self._io = io
        self._image_id = image_id
        self._fd = fd
        self._pos = start
        self._end = end
        self.start = start

    async def read(self, n: int) -> bytes:
        n = min(n, self._end - self._pos)
        if n <= 0:
            return b""
        try:
            data: bytes = await self._io(os.pread, self._fd, n, self._pos)
        except OSError as exc:
            raise _unreadable(self._image_id, exc) from exc
        self._pos += len(data)
        return data

    async def read_blocks(self, n: int) -> list[Buffer]:
        data = await self.read(n)
        return [data] if data else []


class ImageFile:
    """One image's open file (owned by :meth:`FileBackend.open_image`, which closes it)."""

    def __init__(self, image_id: str, fd: int, size: int, io: _Io):
        self.image_id = image_id
        self.size = size
        self._fd = fd
        self._io = io

    def stream(self, start: int, end: int | None) -> FileStream:
        """Bytes ``[start, end)`` (``end=None``: to the end of the file)."""
        stop = self.size if end is None else min(end, self.size)
        return FileStream(self.image_id, self._fd, start, stop, self._io)


class FileBackend:
    """Images are the files of one directory, named by image id."""

    def __init__(
        self,
        directory: Path,
        access_tokens: tuple[str, ...] = (),
        *,
        guard: DirectoryGuard | None = None,
    ):
        self.directory = Path(directory)
        self._tokens = frozenset(access_tokens)
        self._guard = guard

    def _check_directory(self) -> None:
        """Raise the 503 while the store's directory is not ok (vanished, hung, failing)."""
        if self._guard is not None and not self._guard.ok:
            raise _unavailable(self._guard)

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call in the store directory: on the guard's own threads (a hung
        share pins those, never the default executor's), or any worker thread without one."""
        if self._guard is None:
            return await asyncio.to_thread(fn, *args)
        return await self._guard.run_io(fn, *args)

    async def _checked(self, fn: Callable[..., T], *args: Any) -> T:
        """:meth:`io` behind the directory check. A failure of the store, or a missing file,
        makes the guard look at once: if the directory itself is not ok, the answer is its
        503, not the image's 404 or a 502."""
        self._check_directory()
        try:
            return await self.io(fn, *args)
        except (UpstreamError, UpstreamUnavailable) as err:
            if self._guard is None or (isinstance(err, UpstreamError) and err.status != 404):
                raise
            if isinstance(err.__cause__, OSError):
                self._guard.report(err.__cause__)
            await self._guard.check()
            self._check_directory()
            raise

    async def close(self) -> None:
        return None

    def check_token(self, creds: Credentials) -> None:
        """Raise Glance's 401 unless ``creds`` carry one of the access tokens (if any)."""
        if self._tokens and creds.get("x-auth-token") not in self._tokens:
            raise glance_error(
                401, "Unauthorized", "This server could not verify that you are authorized."
            )

    def _path(self, image_id: str) -> Path:
        if not is_image_id(image_id):
            raise _not_found(image_id)
        return self.directory / image_id

    def _open(self, image_id: str) -> tuple[int, os.stat_result]:
        """Open the image's file (call from a thread): a regular file inside the directory.

        The name is opened with ``O_NOFOLLOW``: a plain file in the directory takes that one
        open (and an ``fstat``), never a walk of the path. Only a name that is a symlink is
        resolved, and followed only to a file in the directory itself (a link named by a uuid
        to /etc/passwd is 404); the resolved name is opened with ``O_NOFOLLOW`` too, so a link
        swapped in after the check is refused as well. ``O_NONBLOCK``: a FIFO cannot hang the
        open. Anything but a regular file is 404.
        """
        path = self._path(image_id)
        try:
            fd = self._open_name(image_id, path)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            fd = self._open_link(image_id, path)  # the name is a symlink (or a loop of them)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _not_found(image_id)
        except OSError as exc:
            os.close(fd)
            raise _unreadable(image_id, exc) from exc
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    @staticmethod
    def _open_name(image_id: str, name: str | os.PathLike[str]) -> int:
        """``open(name, O_NOFOLLOW)``; a missing file is 404, ELOOP is raised as is (the
        name is a symlink), any other error is the store's."""
        try:
            return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise _not_found(image_id) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise
            raise _unreadable(image_id, exc) from exc

    def _open_link(self, image_id: str, path: Path) -> int:
        """Open what the symlink ``path`` leads to, if that is in the directory itself."""
        real = os.path.realpath(path)
        root = os.path.realpath(self.directory)
        if os.path.dirname(real) != root:
            log.warning("file upstream: %s leads out of %s (to %s): refused", path, root, real)
            raise _not_found(image_id)
        try:
            return self._open_name(image_id, real)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            log.warning("file upstream: %s became a symlink while opened: refused", real)
            raise _not_found(image_id) from None

    def _stat(self, image_id: str) -> os.stat_result:
        fd, st = self._open(image_id)
        os.close(fd)
        return st

    async def authorize(
        self, image_id: str, creds: Credentials, accept: str | None = None
    ) -> Authorization:
        try:
            self.check_token(creds)
            await self._checked(self._stat, image_id)
        except UpstreamError as err:
            body, headers = shaped(err, accept)
            return Authorization(Decision.DENY, err.status, body, headers)
        return Authorization(Decision.ALLOW)

    async def record(self, image_id: str, creds: Credentials) -> ImageRecord:
        self.check_token(creds)
        return ImageRecord.from_json(await self._checked(self._record_json, image_id))

    def _record_json(self, image_id: str) -> dict[str, Any]:
        st = self._stat(image_id)
        stamp = datetime.datetime.fromtimestamp(st.st_mtime, datetime.UTC)
        when = stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "id": image_id,
            "name": image_id,
            "status": "active",
            "visibility": "public",
            "protected": False,
            "os_hidden": False,
            "owner": None,
            "size": st.st_size,
            "virtual_size": None,
            "checksum": None,
            "os_hash_algo": None,
            "os_hash_value": None,
            "disk_format": "raw",
            "container_format": "bare",
            "min_disk": 0,
            "min_ram": 0,
            "tags": [],
            "created_at": when,
            "updated_at": when,
            "self": f"/v2/images/{image_id}",
            "file": f"/v2/images/{image_id}/file",
            "schema": "/v2/schemas/image",
        }

    @asynccontextmanager
    async def open_image(self, image_id: str, creds: Credentials) -> AsyncIterator[ImageFile]:
        """The image's file, open for reads at any offset: its size is known before the
        first read. Raises UpstreamError (401, 404, 503) or UpstreamUnavailable."""
        self.check_token(creds)
        fd, st = await self._checked(self._open, image_id)
        try:
            yield ImageFile(image_id, fd, st.st_size, self.io)
        finally:
            await self.io(os.close, fd)

    @asynccontextmanager
    async def open_data(
        self, image_id: str, creds: Credentials, start: int, end: int | None
    ) -> AsyncIterator[FileStream]:
        async with self.open_image(image_id, creds) as image:
            yield image.stream(start, end)

    async def records(self, creds: Credentials) -> list[dict[str, Any]]:
        """The records of every image in the directory, by id (``GET /v2/images``)."""
        self.check_token(creds)
        return await self._checked(self._records)

    def _records(self) -> list[dict[str, Any]]:
        images = []
        try:
            names = os.listdir(self.directory)
        except OSError as exc:
            raise UpstreamUnavailable(f"image store: cannot list {self.directory}: {exc}") from exc
        for name in sorted(names):
            if is_image_id(name):
                try:
                    images.append(self._record_json(name))
                except (UpstreamError, UpstreamUnavailable):
                    continue  # gone meanwhile, or unreadable: not listed
        return images


__all__ = ["FileBackend", "FileStream", "ImageFile", "PageError", "glance_error", "shaped"]
