"""Errors of the ``file`` upstream are the upstream's: real faults of the image store give the
caller an upstream error (502, or a cut transfer once the headers went out) and never switch
the cache off for the other images.

The faults are real system calls failing, not patched code: a sysfs attribute that refuses to
be read (``EINVAL``) or opened (``EACCES``, a write-only attribute opened read-only; nothing is
ever written to it), bind-mounted over an image file (the store refuses symlinks that lead out
of it, so a link would only test that), a symbolic link loop (``ELOOP``), an image directory
that vanished.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest
from conftest import Daemon, auth, start_daemon, stop_daemon, wait_complete, wait_idle

MiB = 1 << 20

# Regular files (4096 bytes by stat) whose use fails with a real errno, when the kernel has them.
_FAULTS = {
    "read-EINVAL": "/sys/class/net/lo/speed",  # the loopback device has no link speed
    "open-EACCES": "/sys/bus/pci/rescan",  # write-only: opening it for reading is refused
}


def _faulty(kind: str) -> str:
    path = _FAULTS[kind]
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        pytest.skip(f"{path} does not exist here")
    except OSError:
        return path  # the open fails: the fault we want
    try:
        os.pread(fd, 16, 0)
    except OSError:
        return path
    finally:
        os.close(fd)
    pytest.skip(f"{path} reads fine here")


@contextmanager
def bound_over(target: Path, source: str) -> Iterator[None]:
    """``source`` bind-mounted over the regular file ``target`` (root only)."""
    target.write_bytes(b"")
    done = subprocess.run(["mount", "--bind", source, str(target)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(target)], check=True)


@pytest.fixture
async def filed(tmp_path: Path) -> AsyncIterator[tuple[Daemon, Path]]:
    images = tmp_path / "images"
    images.mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    d = await start_daemon(cache, f"file://{images}")
    yield d, images
    await stop_daemon(d)


@pytest.mark.parametrize("kind", sorted(_FAULTS))
async def test_unreadable_image_fails_only_its_own_download(
    filed: tuple[Daemon, Path], kind: str
) -> None:
    daemon, images = filed
    broken = str(uuid.uuid4())
    with bound_over(images / broken, _faulty(kind)):
        await _fails_alone(daemon, images, broken)


async def _fails_alone(daemon: Daemon, images: Path, broken: str) -> None:
    healthy = str(uuid.uuid4())
    data = os.urandom(5 * MiB + 11)
    (images / healthy).write_bytes(data)

    complete = False
    try:
        status, _, body = await daemon.get(broken)
        complete = status == 200 and len(body) == 4096
    except aiohttp.ClientPayloadError:
        pass  # the headers were out: a cut connection is the only way to say it
    else:
        assert status == 502, f"{broken}: got {status} {body[:200]!r}"
    assert not complete, f"{broken}: an unreadable image came back complete"
    await wait_idle(daemon, broken)

    # The fault was the image store's, not the cache directory's: B is cached as usual.
    status, headers, body = await daemon.get(healthy)
    assert status == 200 and body == data
    assert headers["Cache-Status"] == "cached; fwd=uri-miss; stored", broken
    await wait_complete(daemon, healthy)


async def test_image_that_cannot_be_looked_up_is_a_502(filed: tuple[Daemon, Path]) -> None:
    daemon, images = filed
    broken = str(uuid.uuid4())
    with bound_over(images / broken, _faulty("open-EACCES")):
        status, _, body = await daemon.get(broken)
        assert status == 502, body[:300]
        assert str(images) not in body.decode()  # the cause is logged, not shown
        assert daemon.store.get(broken) is None
        url = f"{daemon.url}/v2/images/{broken}"
        async with daemon.session.get(url, headers=auth(), skip_auto_headers=("Accept",)) as resp:
            text = await resp.text()
            assert resp.status == 502, text
            assert text.startswith("502 Bad Gateway\n\n") and str(images) not in text


async def test_a_symlink_loop_is_no_image(filed: tuple[Daemon, Path]) -> None:
    daemon, images = filed
    looped = str(uuid.uuid4())
    (images / looped).symlink_to(images / looped)
    assert (await daemon.get(looped))[0] == 404
    assert daemon.store.get(looped) is None


async def test_vanished_image_directory_lists_as_503(filed: tuple[Daemon, Path]) -> None:
    """The store's guard looks at once and names the state (issue 10: never a 404, and the
    directory's own state rather than a generic 502)."""
    daemon, images = filed
    shutil.rmtree(images)
    async with daemon.session.get(f"{daemon.url}/v2/images", headers=auth()) as resp:
        body = await resp.json()
        assert resp.status == 503, body
        assert body["title"] == "Service Unavailable"
        assert "image store is unavailable: its directory is vanished" in body["message"]
