"""The format inspector as a stream consumer of a fill: oslo.utils' ``InspectWrapper`` fed the
image's bytes as they pass, deciding the format and its safety checks from the headers.

Ownership and threads: an :class:`Inspector` belongs to one fill. :meth:`Inspector.feed` and
:meth:`Inspector.finish` are called from one thread at a time, in stream order (the fill's
feeder lane); nothing else touches its state while a feed may run. The event loop reads
:attr:`Inspector.observation`, a reference to an immutable value that is None until the
decision and set once then (replaced only by the finish job, with the image's size): in audit
mode after the fill's finish job, in enforce mode also after every feed job, to judge the
header as soon as it is decided (:mod:`cached.safety.audit`). Nothing here runs on the
loop or raises: an exception of the library becomes an
:class:`~cached.safety.verdict.Observation` with ``error`` set (verdict ``error``).

Besides the public API (``InspectWrapper.read``/``close``/``formats``, ``safety_check``), the
decision of when to stop reads three attributes of oslo.utils 10.2 that are not public
(``_inspectors``, ``_errored_inspectors``, ``_capture_regions``): the library has no call
that says "decided". A release that renames them makes every inspection an ``error``
verdict (tests/test_safety_inspect.py fails), never a wrong ``safe``.

How the stream is cut matters to oslo.utils (a region sought one read late is never
captured; a text VMDK descriptor is whatever the first read held), so until the format is
decided the inspector sees the image in fixed, aligned 64 KiB blocks, whatever the
upstream's pieces were: every cut gives the same verdict. Once every candidate inspector is
complete the inspector stops (about 256 KiB into most images, ~3 MiB into a qemu-img VHDX).
When only the end of the stream is still wanted (a streamOptimized VMDK whose grain
directory is in its footer), the inspector keeps the last bytes of the stream (as many as the
library's end-of-stream region holds: 1536) and feeds them once, at the end. Feeding every
later piece instead costs 0.65 CPU s/GiB in 64 KiB pieces (the VMDK inspector re-parses its
header on every read; ``python -m bench.inspect``). What oslo.utils counts as bytes read falls
short then, as it does when the inspector stops early; no check reads that count, and the
sizes of raw content come from the stream, not the library.

An image shorter than 4 KiB is zero-padded to 4 KiB before the end is signalled: a 119-byte
qcow2 with a backing file has a header shorter than oslo.utils' 512-byte region and would
otherwise pass as raw (issue 18, "Measured").

Out-of-order bytes (ranged fills, resumed entries) are not fed; :meth:`Inspector.catch_up`
reads what the stream skipped from the entry's file, in 64 KiB reads, until decided.
"""

from __future__ import annotations

import enum
import importlib.metadata
import logging
import os

from oslo_utils.imageutils import format_inspector as fi

from cached.digest import Buffer
from cached.safety.verdict import Finding, Observation

log = logging.getLogger(__name__)

BLOCK = 64 << 10  # aligned reads until decided
PAD_TO = 4 << 10  # shorter images are zero-padded to this before close
VERSION = importlib.metadata.version("oslo.utils")


class Phase(enum.Enum):
    HEAD = "head"  # undecided: aligned 64 KiB blocks to every inspector
    TAIL = "tail"  # decided but for end-of-stream regions: only the last bytes are kept
    DONE = "done"  # decided (or failed): nothing more is read


class _Piece:
    """The source ``InspectWrapper.read`` pulls from: returns the piece it was handed."""

    def __init__(self) -> None:
        self.data: Buffer = b""

    def read(self, size: int = -1) -> Buffer:
        data, self.data = self.data, b""
        return data


class Inspector:
    """A stream consumer that decides an image's format and safety-check results.

    Args:
        tracing: oslo.utils' own (very verbose) debug logging.
    """

    def __init__(self, *, tracing: bool = False) -> None:
        self.position = 0  # bytes of the image taken in order (fed or buffered)
        self.phase = Phase.HEAD
        self.observation: Observation | None = None  # set once decided
        self.decided_at: int | None = None  # bytes of the image it needed to decide
        self._eaten = 0  # bytes handed to the library (padding included)
        self._source = _Piece()
        self._pending = bytearray()  # the unfed part of the current aligned block
        self._tail = bytearray()  # TAIL: the stream's last bytes, fed at the end
        self._keep = 0  # TAIL: how many (the longest end-of-stream region)
        self._error: str | None = None
        try:
            self._wrapper: fi.InspectWrapper | None = fi.InspectWrapper(
                self._source,  # type: ignore[arg-type]  # only .read is used
                tracing=tracing,
            )
        except Exception as exc:  # the library failed to build its inspectors
            self._wrapper = None
            self._fail(exc)

    @property
    def decided(self) -> bool:
        return self.phase is Phase.DONE

    def feed(self, offset: int, data: Buffer) -> None:
        """Take ``data`` found at ``offset``; bytes not at :attr:`position` are ignored."""
        if self.phase is Phase.DONE or offset != self.position:
            return
        try:
            view = memoryview(data).cast("B")
            self.position += len(view)
            if self.phase is Phase.TAIL:
                self._keep_tail(view)
                return
            while view and self.phase is Phase.HEAD:
                want = BLOCK - len(self._pending)
                if not self._pending and len(view) >= BLOCK:
                    block, view = view[:BLOCK], view[BLOCK:]
                    self._eat(block)
                else:
                    self._pending += view[:want]
                    view = view[want:]
                    if len(self._pending) < BLOCK:
                        break
                    block_bytes, self._pending = bytes(self._pending), bytearray()
                    self._eat(block_bytes)
                self._advance()
            if view and not self.decided:  # the loop left HEAD for TAIL
                self._keep_tail(view)
        except Exception as exc:
            self._fail(exc)

    def finish(self, size: int | None = None) -> Observation:
        """Signal the end of the image (``size`` bytes; default: what was fed) and decide.

        Feeds the buffered rest of the last block, zero-padded to 4 KiB when the image is
        shorter, then closes the wrapper. Returns the observation; never raises.
        """
        if self.observation is not None:
            if size is not None and size != self.observation.size:
                self.observation = _resized(self.observation, size)
            return self.observation
        try:
            if self.phase is not Phase.DONE:
                rest = bytes(self._pending if self.phase is Phase.HEAD else self._tail)
                self._pending = bytearray()
                if rest:
                    self._eat(rest)
                if self.phase is Phase.HEAD and self.position < PAD_TO:
                    # A read of its own: a text VMDK descriptor is recognised only while
                    # every byte read so far is text.
                    self._eat(bytes(PAD_TO - self.position))
                self._decide(size if size is not None else self.position)
        except Exception as exc:
            self._fail(exc)
        if self.observation is None:  # _fail ran
            self.observation = Observation((), size or self.position, VERSION, self._error)
        return self.observation

    def report(self) -> None:
        """The stream-consumer seam's report (on the loop): the verdict reaches the loop
        through the fill's FillAudit once judged, so nothing is told as it streams."""

    def catch_up(self, fd: int, size: int) -> Observation:
        """Read from ``fd`` whatever the stream skipped, until decided, then finish.

        Blocking: call from the feeder thread. Read errors become an ``error`` observation.
        """
        try:
            self._read_from(fd, size)
            if self.phase is Phase.TAIL and self.position < size:
                start = max(self.position, size - self._keep)
                self._keep_tail(memoryview(os.pread(fd, size - start, start)))
                self.position = size
        except OSError as exc:
            self._fail(exc)
        return self.finish(size)

    def read_ahead(self, fd: int, upto: int) -> None:
        """Read from ``fd`` what the stream has not fed yet, up to byte ``upto``, until
        decided, without signalling the end (the image goes on). Blocking: call from the
        feeder thread, once bytes ``[0, upto)`` are in the file. Read errors are a verdict."""
        try:
            self._read_from(fd, upto)
        except OSError as exc:
            self._fail(exc)

    def _read_from(self, fd: int, upto: int) -> None:
        while self.phase is Phase.HEAD and self.position < upto:
            want = min(BLOCK - len(self._pending), upto - self.position)
            data = os.pread(fd, want, self.position)
            if not data:
                break
            self.feed(self.position, data)

    # -- the library, behind never-raising walls

    def _eat(self, chunk: Buffer) -> None:
        assert self._wrapper is not None
        self._source.data = chunk
        self._wrapper.read(len(chunk))
        self._eaten += len(memoryview(chunk))

    def _advance(self) -> None:
        """After a block: stop when decided, or keep only the tail when only ends remain."""
        assert self._wrapper is not None
        waiting_for_end = False
        for inspector in _live(self._wrapper):
            if inspector.complete:
                continue
            regions = inspector._capture_regions.values()
            open_regions = [r for r in regions if not r.complete]
            if all(isinstance(r, fi.EndCaptureRegion) for r in open_regions):
                waiting_for_end = waiting_for_end or inspector.format_match
            else:
                return  # still undecided
        if waiting_for_end:
            self.phase = Phase.TAIL
            self._keep = max(
                r.length
                for i in _live(self._wrapper)
                for r in i._capture_regions.values()
                if isinstance(r, fi.EndCaptureRegion)
            )
        else:
            self._decide(None)

    def _keep_tail(self, view: memoryview) -> None:
        """Keep the stream's last bytes: all an end-of-stream region will hold."""
        if len(view) >= self._keep:
            self._tail = bytearray(view[len(view) - self._keep :])
        else:
            self._tail += view
            del self._tail[: -self._keep]

    def _decide(self, size: int | None) -> None:
        assert self._wrapper is not None
        self._wrapper.close()
        matches = self._wrapper.formats or []
        findings = []
        for inspector in sorted(matches, key=str):
            failed: tuple[str, ...] = ()
            unreadable = None
            try:
                inspector.safety_check()
            except fi.SafetyCheckFailed as exc:
                failed = tuple(sorted(exc.failures))
            except fi.ImageFormatError as exc:
                unreadable = str(exc)[:200] or type(exc).__name__
            findings.append(Finding(str(inspector), failed, unreadable, _virtual_size(inspector)))
        # After the tail: the whole stream; else what the library was handed (a piece's
        # later blocks were never needed).
        was_tail = self.phase is Phase.TAIL
        self.decided_at = self.position if was_tail else min(self._eaten, self.position)
        self.phase = Phase.DONE
        self._pending = bytearray()
        self.observation = Observation(
            tuple(findings), size if size is not None else self.position, VERSION
        )

    def _fail(self, exc: BaseException) -> None:
        log.warning("format inspection failed: %s: %s", type(exc).__name__, exc)
        self.phase = Phase.DONE
        self._pending = bytearray()
        self._error = f"{type(exc).__name__}: {exc}"[:200]
        self.observation = Observation((), self.position, VERSION, self._error)


def _live(wrapper: fi.InspectWrapper) -> list[fi.FileInspector]:
    """The wrapper's non-raw inspectors that have not given up on the stream."""
    errored = wrapper._errored_inspectors
    return [i for i in wrapper._inspectors if i.NAME != "raw" and i not in errored]


def _virtual_size(inspector: fi.FileInspector) -> int | None:
    """The disk size the header states; None where oslo.utils has none (0 means unknown
    there; qed, gpt and raw count bytes read; luks subtracts from bytes read)."""
    if type(inspector).virtual_size in (
        fi.FileInspector.virtual_size,
        fi.LUKSInspector.virtual_size,
    ):
        return None
    try:
        size = int(inspector.virtual_size)
    except Exception:  # a header too short or inconsistent to give one
        return None
    return size if size > 0 else None


def _resized(seen: Observation, size: int) -> Observation:
    return Observation(seen.findings, size, seen.version, seen.error)
