"""Enforce mode acting on image signatures (issue 18: "a hit = complete + verdict allowed +
signature if required"): ``image_safety_mode: enforce`` with ``image_signature_verify``, a
running daemon in front of the fake Glance, signatures made by ``openssl`` (the PKI of
tests/test_safety_signature.py).

Per ``image_safety_on_violation``: a good signature is a hit; a bad one (and an unsigned
image when signatures are required) is a violation handled like a content violation: the
first download is cut before its last byte (refuse) or served uncached (pass-through), the
violation is recorded in ``verdicts/`` with the signature check, and later downloads get
``403`` naming the result or the upstream's data (``detail=bad-signature``) without a fill.
A PATCH fixing the signature makes the image a hit again after one more fill; an override
for its content spares it; a complete entry whose signature a PATCH breaks is dropped and
recorded at its next download; a restart keeps the record unless it no longer holds.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import (
    Daemon,
    auth,
    manage,
    start_daemon,
    stop_daemon,
    wait_complete,
    wait_idle,
    wait_until,
)
from fakeglance import FakeGlance, FakeImage
from scrapes import Delta, scrape
from test_ctl import ctl
from test_safety_admin import admin
from test_safety_enforce import data_gets, fetch, kept_out, no_entry, record_of, settled
from test_safety_signature import PKI, pki, signing_options, stored

from cached.app import MANAGER
from cached.download.proxy import _record_of
from cached.jobs.prefetch import Outcome as PrefetchOutcome
from cached.safety import signature as sig
from cached.safety import violations
from cached.safety.inspect import VERSION
from cached.safety.signature import Result, Signed
from cached.safety.verdict import Outcome, Verdict
from cached.upstream import Credentials

__all__ = ["pki"]  # the module-scoped PKI fixture, shared

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

MiB = 1 << 20
HIT = "cached; hit"
MISS = "cached; fwd=uri-miss; stored"
SIGNATURE_BYPASS = "cached; fwd=bypass; detail=bad-signature"
MODES = ["pass-through", "refuse"]


async def enforcing(
    tmp_path: Path, glance: FakeGlance, pki: PKI, on_violation: str, *, required: bool = False
) -> Daemon:
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    return await start_daemon(
        cache,
        glance.url,
        image_safety_mode="enforce",
        image_safety_on_violation=on_violation,
        **signing_options(pki, image_signature_required=required),
    )


def signed_image(glance: FakeGlance, pki: PKI, data: bytes, *, good: bool = True) -> FakeImage:
    props = pki.properties("rsa", data, "SHA-256")  # not os_hash_algo: one more consumer
    if not good:
        props[sig.SIGNATURE] = pki.sign("rsa", data + b"x", "SHA-256")
    return glance.add_image(data, properties=props)


async def patch(daemon: Daemon, image_id: str, name: str, value: str) -> None:
    """A property changed through the proxy (Proxy.apply_change -> Signatures.changed)."""
    async with daemon.session.patch(
        f"{daemon.url}/v2/images/{image_id}",
        json=[{"op": "replace", "path": f"/{name}", "value": value}],
        headers={**auth(), "Content-Type": "application/openstack-images-v2.1-json-patch"},
    ) as resp:
        assert resp.status == 200, await resp.text()


async def first_download(daemon: Daemon, image_id: str, data: bytes, on_violation: str) -> None:
    """The miss that finds the violation: refuse cuts it before its last byte (never a clean
    200); pass-through serves it whole, from its fill, which is then not committed."""
    if on_violation == "pass-through":
        status, headers, body = await fetch(daemon, image_id)
        assert (status, headers["Cache-Status"], body == data) == (200, MISS, True)
        return
    received = 0
    async with daemon.session.get(daemon.file_url(image_id), headers=auth()) as resp:
        assert (resp.status, resp.headers["Cache-Status"]) == (200, MISS)
        with pytest.raises(aiohttp.ClientPayloadError):
            async for piece in resp.content.iter_any():
                received += len(piece)
    assert received < len(data)  # the held-back last byte never went


async def violating(
    daemon: Daemon, glance: FakeGlance, image_id: str, data: bytes, on_violation: str, result: str
) -> None:
    """A later download: 403 naming the result (refuse, no upstream data) or the upstream's
    data with detail=bad-signature (pass-through); never a fill, never the cache's bytes."""
    before = data_gets(glance, image_id)
    status, headers, body = await fetch(daemon, image_id, Accept="text/plain")
    if on_violation == "refuse":
        assert (status, headers["Cached-Image-Signature"]) == (403, result)
        assert headers["Cached-Image-Verdict"].startswith("safe")
        assert "Cache-Status" not in headers
        assert body is not None and data[:64] not in body
        meaning = sig.MEANINGS[Result(result)]
        message = (
            f"Image {image_id} is refused by the image cache: its signature is {result} "
            f"({meaning})."
        )
        assert body.decode() == f"403 Forbidden\n\n{message}\n\n   "
        status, headers, body = await fetch(daemon, image_id, Accept="application/json")
        assert status == 403 and body is not None
        assert json.loads(body)["message"] == f"{message}<br /><br />\n\n\n"
        assert data_gets(glance, image_id) == before
    else:
        assert (status, headers["Cache-Status"], body == data) == (200, SIGNATURE_BYPASS, True)
        assert data_gets(glance, image_id) == before + 1
    assert no_entry(daemon, image_id)


async def hits(daemon: Daemon, image_id: str, data: bytes, result: str) -> None:
    status, headers, body = await fetch(daemon, image_id)
    assert (status, headers["Cache-Status"], body == data) == (200, MISS, True)
    await wait_complete(daemon, image_id)
    for _ in range(2):
        status, headers, body = await fetch(daemon, image_id)
        assert (status, headers["Cache-Status"], body == data) == (200, HIT, True)
        assert headers["Cached-Image-Signature"] == result
    await settled(daemon)
    assert record_of(daemon, image_id) is None


@pytest.mark.parametrize("on_violation", MODES)
@pytest.mark.parametrize(
    ("kind", "required", "result"),
    [
        ("good", True, None),  # verified: a hit
        ("unsigned", False, None),  # unsigned, not required: a hit
        ("bad", False, "bad-signature"),  # signed: must verify, required or not
        ("unsigned", True, "unsigned"),  # required: a violation
    ],
)
async def test_a_signature_enforce_does_not_allow_is_a_violation(
    glance: FakeGlance,
    tmp_path: Path,
    pki: PKI,
    on_violation: str,
    kind: str,
    required: bool,
    result: str | None,
) -> None:
    data = os.urandom(3 * MiB + 5)
    if kind == "unsigned":
        image = glance.add_image(data)
    else:
        image = signed_image(glance, pki, data, good=kind == "good")
    daemon = await enforcing(tmp_path, glance, pki, on_violation, required=required)
    try:
        if result is None:
            await hits(daemon, image.id, data, "verified" if kind == "good" else "unsigned")
            return
        before = await scrape(daemon)
        await first_download(daemon, image.id, data, on_violation)
        recorded = await kept_out(daemon, image.id)
        assert (recorded.image_id, recorded.os_hash_value) == (image.id, image.os_hash_value)
        assert recorded.verdict.allowed  # the content is fine: its signature is not
        assert recorded.signature is not None and recorded.signature.result.value == result
        assert recorded.signature.fingerprint == Signed.of(image.properties).fingerprint()
        assert not (daemon.cache_dir / image.id).exists()
        for _ in range(2):
            await violating(daemon, glance, image.id, data, on_violation, result)
        counted = Delta(before, await scrape(daemon))
        assert counted("cached_image_signatures_total", result=result) == 1
        assert counted("cached_image_verdicts_total", verdict="safe") == 1
        if on_violation == "pass-through":
            assert counted("cached_bypass_total", reason="bad-signature") == 2
        status, listing = await admin(daemon, "GET", "/v2/cache/safety")
        assert [r["image_id"] for r in listing["violations"]] == [image.id]
        status, row = await admin(daemon, "GET", f"/v2/cache/safety/{image.id}")
        assert (status, row["verdict"], row["signature_violation"]) == (200, "safe", result)
    finally:
        await stop_daemon(daemon)


@pytest.mark.parametrize("on_violation", MODES)
async def test_a_patch_fixing_the_signature_makes_it_a_hit_again(
    glance: FakeGlance, tmp_path: Path, pki: PKI, on_violation: str
) -> None:
    """The record is forgotten once the image's signature properties are not those it was
    made for: the next download fills again and the image is judged anew."""
    data = os.urandom(2 * MiB)
    image = signed_image(glance, pki, data, good=False)
    daemon = await enforcing(tmp_path, glance, pki, on_violation)
    try:
        await first_download(daemon, image.id, data, on_violation)
        await kept_out(daemon, image.id)
        await violating(daemon, glance, image.id, data, on_violation, "bad-signature")
        # another property changed: the same signature properties, still a violation
        await patch(daemon, image.id, "name", "renamed")
        await violating(daemon, glance, image.id, data, on_violation, "bad-signature")
        await patch(daemon, image.id, sig.SIGNATURE, pki.sign("rsa", data, "SHA-256"))
        await hits(daemon, image.id, data, "verified")
    finally:
        await stop_daemon(daemon)


@pytest.mark.parametrize("on_violation", MODES)
async def test_a_patch_breaking_the_signature_of_a_hit_keeps_it_out(
    glance: FakeGlance, tmp_path: Path, pki: PKI, on_violation: str
) -> None:
    """A complete entry verified at its fill: after a PATCH its next download verifies
    again from the file, before any byte; the entry is dropped and the violation recorded."""
    data = os.urandom(2 * MiB)
    image = signed_image(glance, pki, data)
    daemon = await enforcing(tmp_path, glance, pki, on_violation)
    try:
        await hits(daemon, image.id, data, "verified")
        await patch(daemon, image.id, sig.SIGNATURE, pki.sign("rsa", b"other", "SHA-256"))
        before = data_gets(glance, image.id)
        status, headers, body = await fetch(daemon, image.id)
        assert headers.get("Cache-Status") != HIT
        if on_violation == "refuse":
            assert (status, headers["Cached-Image-Signature"]) == (403, "bad-signature")
            assert data_gets(glance, image.id) == before
        else:
            assert (status, headers["Cache-Status"], body == data) == (
                200,
                SIGNATURE_BYPASS,
                True,
            )
        recorded = await kept_out(daemon, image.id)
        assert recorded.signature is not None
        assert recorded.signature.result is Result.BAD_SIGNATURE
        await violating(daemon, glance, image.id, data, on_violation, "bad-signature")
    finally:
        await stop_daemon(daemon)


@pytest.mark.parametrize("on_violation", MODES)
async def test_an_override_spares_a_signature_failure(
    glance: FakeGlance, tmp_path: Path, pki: PKI, on_violation: str
) -> None:
    """An override bound to the image's id and os_hash_value: its recorded signature
    violation is forgotten, the image is filled, committed and hit (the result still sent)."""
    data = os.urandom(2 * MiB)
    image = signed_image(glance, pki, data, good=False)
    daemon = await enforcing(tmp_path, glance, pki, on_violation)
    try:
        await first_download(daemon, image.id, data, on_violation)
        await kept_out(daemon, image.id)
        path = f"/v2/cache/safety/{image.id}/override"
        status, _ = await admin(daemon, "PUT", path, {"os_hash_value": image.os_hash_value})
        assert status == 200
        assert record_of(daemon, image.id) is None
        await hits(daemon, image.id, data, "bad-signature")
        status, _ = await admin(daemon, "DELETE", path)
        assert status == 204
        # withdrawn: the complete entry's signature is a violation again at its next download
        status, headers, _ = await fetch(daemon, image.id)
        assert headers.get("Cache-Status") != HIT
        recorded = await kept_out(daemon, image.id)
        assert recorded.signature is not None
    finally:
        await stop_daemon(daemon)


async def test_a_restart_keeps_a_signature_record_while_it_holds(
    glance: FakeGlance, tmp_path: Path, pki: PKI
) -> None:
    """Read back at start: kept under the same anchors and rule; an unsigned image's record
    is forgotten once signatures are not required any more (it is then a hit)."""
    bad_data, unsigned_data = os.urandom(MiB), os.urandom(MiB)
    bad = signed_image(glance, pki, bad_data, good=False)
    unsigned = glance.add_image(unsigned_data)
    daemon = await enforcing(tmp_path, glance, pki, "refuse", required=True)
    try:
        for image, data in ((bad, bad_data), (unsigned, unsigned_data)):
            await first_download(daemon, image.id, data, "refuse")
            await kept_out(daemon, image.id)
    finally:
        await stop_daemon(daemon)
    daemon = await enforcing(tmp_path, glance, pki, "refuse", required=False)
    try:
        await violating(daemon, glance, bad.id, bad_data, "refuse", "bad-signature")
        assert record_of(daemon, unsigned.id) is None
        await hits(daemon, unsigned.id, unsigned_data, "unsigned")
    finally:
        await stop_daemon(daemon)
    # without image_signature_verify a signature record does not hold: removed at start
    cache = tmp_path / "cache"
    daemon = await start_daemon(
        cache, glance.url, image_safety_mode="enforce", image_safety_on_violation="refuse"
    )
    try:
        assert record_of(daemon, bad.id) is None
        status, headers, body = await fetch(daemon, bad.id)
        assert (status, headers["Cache-Status"], body == bad_data) == (200, MISS, True)
    finally:
        await stop_daemon(daemon)


def test_signature_records_round_trip_and_parse_strictly(pki: PKI) -> None:
    image_id = str(uuid.uuid4())
    checked = sig.verify(Signed.of({sig.SIGNATURE: "AAAA"}), None, pki.anchors())
    assert checked.result is Result.ERROR
    stored = sig.loads(sig.dumps(checked))  # as stored: without its reason
    safe = Verdict(Outcome.SAFE, "raw", "raw", version=VERSION, policy="0" * 8)
    found = violations.Violation(image_id, "ab" * 64, safe, stored)
    raw = violations.dumps(found)
    assert len(raw) <= violations.MAX_LEN
    assert violations.loads(raw) == found
    doc = json.loads(raw)
    assert set(doc) == {"v", "id", "os_hash_value", "verdict", "signature"}
    plain = json.loads(violations.dumps(violations.Violation(image_id, "ab" * 64, safe)))
    assert set(plain) == {"v", "id", "os_hash_value", "verdict"}  # as before signatures
    for broken in ({**doc, "signature": "bad-signature"}, {**doc, "signature": {"v": 1}}):
        with pytest.raises(ValueError):
            violations.loads(json.dumps(broken, separators=(",", ":")).encode())
    assert not found.properties_differ(stored.fingerprint)
    assert found.properties_differ("f" * 16)
    assert not found.properties_differ(None)  # no record at hand: the record stands
    assert not violations.Violation(image_id, None, safe).properties_differ("f" * 16)


@pytest.mark.parametrize("on_violation", MODES)
async def test_a_prefetch_with_a_bad_signature_is_dequeued(
    glance: FakeGlance, tmp_path: Path, pki: PKI, on_violation: str
) -> None:
    """Like a content violation: dequeued, not retried; once known, before any transfer."""
    data = os.urandom(MiB)
    image = signed_image(glance, pki, data, good=False)
    cache = tmp_path / "cache"
    cache.mkdir()
    daemon = await start_daemon(
        cache,
        glance.url,
        image_safety_mode="enforce",
        image_safety_on_violation=on_violation,
        service_token="token-admin",
        **signing_options(pki),
    )
    try:
        prefetcher = daemon.app[MANAGER].prefetcher
        queued = f"{daemon.admin_base}/v2/queued_images"
        for again in (False, True):
            async with manage(daemon).put(f"{queued}/{image.id}") as resp:
                assert resp.status == 200
            before = data_gets(glance, image.id)
            counts = await prefetcher.run()
            assert (counts[PrefetchOutcome.REFUSED], counts[PrefetchOutcome.FAILED]) == (1, 0)
            async with manage(daemon).get(queued) as resp:
                assert (await resp.json())["queued_images"] == []
            recorded = await kept_out(daemon, image.id)
            assert recorded.signature is not None
            assert (data_gets(glance, image.id) == before) is again
    finally:
        await stop_daemon(daemon)


async def test_a_fill_reopened_for_a_joined_download_checks_the_signature(
    glance: FakeGlance, tmp_path: Path, pki: PKI
) -> None:
    """A download that joined a fill (it looked no record up) and must open a new one (that
    fill ended meanwhile) opens it with the upstream's record when signatures are verified:
    the record the entry keeps has no signature properties, and no longer passes for an
    unsigned image's (its fill gets no signature check; the first hit verifies)."""
    data = os.urandom(9 * MiB)
    image = signed_image(glance, pki, data, good=False)
    daemon = await enforcing(tmp_path, glance, pki, "refuse")
    try:
        status, _, body = await fetch(daemon, image.id, Range="bytes=0-99")
        assert (status, body) == (206, data[:100])
        await wait_idle(daemon, image.id)
        entry = daemon.store.get(image.id)
        assert entry is not None and not entry.complete
        signatures = daemon.proxy.signatures
        assert signatures is not None
        kept = _record_of(entry)
        assert kept.rebuilt and signatures.for_record(kept) is None
        record = await daemon.proxy._fill_record(entry, Credentials.from_headers(auth()))
        assert not record.rebuilt
        assert record.raw[sig.SIGNATURE] == image.properties[sig.SIGNATURE]
        fill_check = signatures.for_record(record)
        assert fill_check is not None and not fill_check.signed.unsigned
    finally:
        await stop_daemon(daemon)


async def audited(daemon: Daemon) -> dict[str, Any]:
    """An audit pass started through the management API, waited for; its result's JSON."""
    safety = daemon.proxy.safety
    assert safety is not None
    before = safety.last_audit
    status, answer = await admin(daemon, "POST", "/v2/cache/safety/audit")
    assert (status, answer["started"]) == (202, True)
    await wait_until(lambda: safety.last_audit is not before, "the audit ran")
    await settled(daemon)
    status, listing = await admin(daemon, "GET", "/v2/cache/safety")
    assert status == 200
    last: dict[str, Any] = listing["audit"]["last"]
    return last


@pytest.mark.parametrize("mode", ["audit", "enforce"])
async def test_the_audit_notices_a_signature_changed_at_the_upstream(
    glance: FakeGlance, tmp_path: Path, pki: PKI, mode: str
) -> None:
    """A signature property changed at the upstream itself (not through the proxy: no
    Proxy.image_changed) is noticed by the audit, which looks the record up with the
    daemon's credentials and verifies again from the file: audit mode re-records the
    result; enforce (refuse) keeps the image out as at a hit (dropped, recorded, 403)."""
    data = os.urandom(2 * MiB)
    image = signed_image(glance, pki, data)
    cache = tmp_path / "cache"
    cache.mkdir()
    daemon = await start_daemon(
        cache,
        glance.url,
        image_safety_mode=mode,
        image_safety_on_violation="refuse",
        service_token="token-admin",
        **signing_options(pki),
    )
    try:
        status, headers, body = await fetch(daemon, image.id)
        assert (status, headers["Cache-Status"], body == data) == (200, MISS, True)
        await wait_complete(daemon, image.id)
        check = stored(daemon, image.id)
        assert check is not None and check.result is Result.VERIFIED
        last = await audited(daemon)  # nothing changed: checked, kept
        assert (last["signatures_checked"], last["signatures_changed"]) == (1, 0)
        assert last["signatures_skipped"] == 0
        image.properties[sig.SIGNATURE] = pki.sign("rsa", b"other", "SHA-256")  # upstream only
        last = await audited(daemon)
        assert (last["signatures_checked"], last["signatures_changed"]) == (1, 1)
        if mode == "audit":
            check = stored(daemon, image.id)
            assert check is not None and check.result is Result.BAD_SIGNATURE
            assert check.fingerprint == Signed.of(image.properties).fingerprint()
            assert record_of(daemon, image.id) is None
            return
        recorded = await kept_out(daemon, image.id)
        assert recorded.verdict.allowed
        assert recorded.signature is not None
        assert recorded.signature.result is Result.BAD_SIGNATURE
        before = data_gets(glance, image.id)
        status, headers, _ = await fetch(daemon, image.id)
        assert (status, headers["Cached-Image-Signature"]) == (403, "bad-signature")
        assert data_gets(glance, image.id) == before
        status, listing = await admin(daemon, "GET", "/v2/cache/safety")
        assert [(r["image_id"], r["signature_violation"]) for r in listing["violations"]] == [
            (image.id, "bad-signature")
        ]
    finally:
        await stop_daemon(daemon)


async def test_the_audit_without_credentials_counts_signatures_it_cannot_check(
    glance: FakeGlance, tmp_path: Path, pki: PKI
) -> None:
    data = os.urandom(MiB)
    image = signed_image(glance, pki, data)
    cache = tmp_path / "cache"
    cache.mkdir()
    daemon = await start_daemon(cache, glance.url, **signing_options(pki))
    try:
        status, _, _ = await fetch(daemon, image.id)
        assert status == 200
        await wait_complete(daemon, image.id)
        image.properties[sig.SIGNATURE] = pki.sign("rsa", b"other", "SHA-256")
        last = await audited(daemon)
        assert (last["signatures_checked"], last["signatures_skipped"]) == (0, 1)
        check = stored(daemon, image.id)
        assert check is not None and check.result is Result.VERIFIED  # not known here
    finally:
        await stop_daemon(daemon)


async def test_an_admin_recheck_verifies_a_changed_signature_again(
    glance: FakeGlance, tmp_path: Path, pki: PKI
) -> None:
    """``POST /v2/cache/safety/{id}/recheck`` checks the signature against the upstream's
    record too: under enforce (refuse) a result now refused keeps the image out."""
    data = os.urandom(MiB)
    image = signed_image(glance, pki, data)
    cache = tmp_path / "cache"
    cache.mkdir()
    daemon = await start_daemon(
        cache,
        glance.url,
        image_safety_mode="enforce",
        image_safety_on_violation="refuse",
        service_token="token-admin",  # (the record looked up with the daemon's credentials)
        **signing_options(pki),
    )
    try:
        await hits(daemon, image.id, data, "verified")
        image.properties[sig.SIGNATURE] = pki.sign("rsa", b"other", "SHA-256")  # upstream only
        status, row = await admin(daemon, "POST", f"/v2/cache/safety/{image.id}/recheck")
        assert (status, row["verdict"], row["signature_violation"]) == (
            200,
            "safe",
            "bad-signature",
        )
        recorded = await kept_out(daemon, image.id)
        assert recorded.signature is not None
        assert recorded.signature.result is Result.BAD_SIGNATURE
        await violating(daemon, glance, image.id, data, "refuse", "bad-signature")
    finally:
        await stop_daemon(daemon)


async def test_cached_manage_safety_list_shows_the_images_kept_out(
    glance: FakeGlance, tmp_path: Path, pki: PKI, capsys: pytest.CaptureFixture[str]
) -> None:
    """``cached-manage safety list``: under enforce, the images kept out of the cache (here
    for a bad signature) follow the cached ones; ``--json`` passes the API's rows through."""
    data = os.urandom(MiB)
    good_data = os.urandom(MiB)
    bad = signed_image(glance, pki, data, good=False)
    good = signed_image(glance, pki, good_data)
    daemon = await enforcing(tmp_path, glance, pki, "refuse")
    try:
        await first_download(daemon, bad.id, data, "refuse")
        await kept_out(daemon, bad.id)
        await hits(daemon, good.id, good_data, "verified")
        host = ("-H", daemon.admin_url)
        assert await ctl(*host, "safety", "list") == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == "Found 1 cached images..."
        assert [c.strip() for c in lines[4].split("|")[1:-1]][:2] == [good.id, "safe"]
        at = lines.index("Kept out of the cache (enforce): 1 image")
        assert [c.strip() for c in lines[at + 2].split("|")[1:-1]] == [
            "ID",
            "Verdict",
            "Checks",
            "Signature",
            "Override",
        ]
        cells = [c.strip() for c in lines[at + 4].split("|")[1:-1]]
        assert cells == [bad.id, "safe", "-", "bad-signature", "-"]
        assert await ctl(*host, "--json", "safety", "list") == 0
        answer = json.loads(capsys.readouterr().out)
        assert [v["image_id"] for v in answer["verdicts"]] == [good.id]
        assert [
            (v["host"], v["image_id"], v["cached"], v["signature_violation"])
            for v in answer["violations"]
        ] == [(daemon.admin_url, bad.id, False, "bad-signature")]
        assert answer["errors"] == []
    finally:
        await stop_daemon(daemon)
