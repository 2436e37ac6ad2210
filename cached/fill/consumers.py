"""A fill's stream consumers: what reads every byte of an image as it is written.

The seam for a second reader of the stream (a format inspector beside the digest). The
fill's :class:`~cached.fill.pipeline.Pipeline` gives each consumer, in order:

* ``feed(offset, data)`` for every piece, in stream order, on the fill's *feeder lane* (a
  worker thread; one job at a time per fill). A piece stays in flight until written and fed,
  so a slow consumer slows the transfer instead of queueing bytes. Pieces that arrive out
  of order (range transfers) are fed too; a consumer ignores what it cannot use.
* ``catch_up(fd, size)`` once every chunk is written, before the commit, on the same lane:
  read back from the file what the stream skipped (range fills, resumed entries), for any
  consumer, whether or not the image has a digest. OSError becomes StoreUnavailable.
* ``report()`` on the event loop after each of its feed jobs and after its catch-up: the one
  way a consumer tells the loop what it found (it may call a callback it was built with).
  It must not block.

The consumers are the digest (:class:`cached.digest.Digest`), which the fill compares in
its VERIFYING state, and the format inspection (:class:`cached.safety.audit.FillAudit`),
whose ``report`` judges the header as soon as it is decided (enforce mode stops a fill whose
content violates the policy there). A consumer never raises from ``feed``: what it cannot
read is its own verdict, not the fill's failure.
"""

from __future__ import annotations

from typing import Protocol

from cached.upstream import Buffer


class StreamConsumer(Protocol):
    def feed(self, offset: int, data: Buffer) -> None:
        """Take ``data`` found at ``offset`` (feeder lane, in stream order)."""

    def catch_up(self, fd: int, size: int) -> object:
        """Read what the stream skipped from ``fd`` (feeder lane, before the commit); what
        it returns is ignored."""

    def report(self) -> None:
        """Tell the loop what was found so far (event loop)."""
