"""Re-inspection, the audit job and the admin side of content safety (issue 18) against a
running daemon (in-process on loopback, fake Glance, real files and xattrs):

- an entry whose verdict is of another oslo.utils version, or another policy, or which has
  none (filled with ``image_safety_mode: off``), is inspected again: on its first hit, by
  the audit, by an admin's recheck; the new verdict is stored and the commit record kept;
- an audit of 1,000 entries runs with no blocking call on the loop (the autouse
  ``no_blocking_calls_on_the_loop`` fixture of conftest.py fails any);
- the management API's ``/v2/cache/safety`` endpoints and ``cached-manage safety``; an
  override is bound to the image's ``os_hash_value``, logged, and survives a restart;
- the verdict metrics pass ``promtool check metrics``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, manage, start_daemon, stop_daemon, wait_complete, wait_until
from fakeglance import FakeGlance
from scrapes import scrape, value
from test_ctl import ctl
from test_safety_audit import HIT, as_older_entry, make, miss_then_hit, stored_verdict

from cached.app import CONFIG, SCHEDULER
from cached.ops.lifecycle import LIVE, RELOADABLES
from cached.safety import overrides, record
from cached.safety.audit import Safety
from cached.safety.inspect import VERSION
from cached.safety.verdict import Outcome, Policy, Verdict
from cached.store import Entry

UNSAFE_RAW = 'unsafe; detected="qcow2"; declared="raw"; checks="backing_file"'


def safety_of(daemon: Daemon) -> Safety:
    safety = daemon.filler.safety
    assert safety is not None
    return safety


async def admin(daemon: Daemon, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with manage(daemon).request(method, f"{daemon.admin_base}{path}", json=body) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


def record_gets(glance: FakeGlance, image_id: str) -> int:
    """``GET /v2/images/{id}`` requests the upstream saw (record look-ups)."""
    return sum(r.method == "GET" and r.path == f"/v2/images/{image_id}" for r in glance.requests)


def rewrite_verdict(path: Path, **changes: Any) -> None:
    """Change fields of the stored verdict behind the daemon's back (an older daemon wrote
    it): the file's ctime moves, so the entry is re-verified by digest first, as it would be."""
    doc = json.loads(os.getxattr(path, record.NAME))
    doc.update(changes)
    os.setxattr(path, record.NAME, json.dumps(doc, separators=(",", ":")).encode())


# --------------------------------------------------------------------- re-inspection
@pytest.mark.parametrize("changed", ["oslo.utils version", "policy"])
async def test_a_verdict_of_another_version_or_policy_is_made_again_on_the_first_hit(
    glance: FakeGlance, tmp_path: Path, changed: str
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    data = make(tmp_path, "backing")
    image = glance.add_image(data, disk_format="raw")
    first = await start_daemon(cache, glance.url)
    try:
        await miss_then_hit(first, image.id, data)
    finally:
        await stop_daemon(first)
    options: dict[str, object] = {}
    if changed == "oslo.utils version":
        # What an older oslo.utils judged (it missed the backing file): kept until inspected
        # again by this one.
        rewrite_verdict(cache / image.id, oslo="10.1.0", verdict="safe", checks=[])
    else:  # qcow2 no longer allowed: the policy's fingerprint changes
        options["image_safety_allowed_formats"] = ["raw", "gpt", "iso"]
    second = await start_daemon(cache, glance.url, **options)
    try:
        old = stored_verdict(second, image.id)
        assert old is not None and not safety_of(second).current(old)
        before = await scrape(second)
        # Concurrent first hits share one inspection (or find its verdict current).
        answers = await asyncio.gather(*(second.get(image.id) for _ in range(4)))
        for status, headers, body in answers:
            assert (status, headers["Cache-Status"], body == data) == (200, HIT, True)
        verdict = stored_verdict(second, image.id)
        assert verdict is not None and safety_of(second).current(verdict)
        assert (verdict.version, verdict.policy) == (VERSION, safety_of(second).fingerprint)
        expected = UNSAFE_RAW
        if changed == "policy":
            assert verdict.checks == ("allowed_formats", "backing_file")
            expected = (
                'unsafe; detected="qcow2"; declared="raw"; checks="allowed_formats backing_file"'
            )
        assert {headers["Cached-Image-Verdict"] for _, headers, _ in answers} == {expected}
        entry = second.store.get(image.id)
        assert entry is not None and entry.complete and not entry.suspect
        # Current now: the next hit reads it from memory, inspects nothing.
        assert (await second.get(image.id))[1]["Cached-Image-Verdict"] == expected
        after = await scrape(second)

        def reinspections(samples: Any) -> float:
            return sum(
                value(samples, "cached_image_reinspections_total", verdict=o.value) for o in Outcome
            )

        assert reinspections(after) - reinspections(before) == 1
    finally:
        await stop_daemon(second)


async def test_entries_cached_without_inspection_get_a_verdict_from_the_audit(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """Filled with ``off`` before entries kept their declared formats (as before inspection
    existed): no verdict, no declaration. The audit inspects them from their file, their
    declaration looked up with the daemon's own credentials."""
    cache = tmp_path / "cache"
    cache.mkdir()
    unsafe = make(tmp_path, "backing")
    clean = make(tmp_path, "clean")
    images = [
        glance.add_image(unsafe, disk_format="raw"),
        glance.add_image(clean, disk_format="raw"),  # a qcow2 declared raw: mismatch
        glance.add_image(clean, disk_format="qcow2"),
    ]
    first = await start_daemon(cache, glance.url, image_safety_mode="off")
    try:
        for image in images:
            assert (await first.get(image.id))[0] == 200
            await wait_complete(first, image.id)
    finally:
        await stop_daemon(first)
    assert all(record.NAME not in os.listxattr(cache / i.id) for i in images)
    for image in images:
        await as_older_entry(cache / image.id)
    second = await start_daemon(cache, glance.url, service_token="token-admin")
    try:
        scheduler = second.app[SCHEDULER]
        assert scheduler.get_job("audit").trigger.interval.total_seconds() == 3600  # beside scrub
        old = second.app[CONFIG]  # a reload reschedules it
        assert "image_safety_audit_interval" in LIVE
        new = dataclasses.replace(old, image_safety_audit_interval=600)
        assert second.app[RELOADABLES].apply(old, new) == []
        assert scheduler.get_job("audit").trigger.interval.total_seconds() == 600
        status, answer = await admin(second, "POST", "/v2/cache/safety/audit")
        assert (status, answer["started"]) == (202, True)
        safety = safety_of(second)
        await wait_until(lambda: safety.last_audit is not None, "the audit ran")
        result = safety.last_audit
        assert result is not None
        assert (result.entries, result.inspected, result.current) == (3, 3, 0)
        outcomes = [stored_verdict(second, i.id) for i in images]
        assert [(v.outcome, v.detected, v.declared) for v in outcomes if v] == [
            (Outcome.UNSAFE, "qcow2", "raw"),
            (Outcome.MISMATCH, "qcow2", "raw"),
            (Outcome.SAFE, "qcow2", "qcow2"),
        ]
        for image in images:
            entry = second.store.get(image.id)
            assert entry is not None and not entry.suspect  # commit records written again
        # A second pass finds them current.
        again = await safety.audit(second.store.complete_entries, lambda e: False)
        assert (again.inspected, again.current) == (0, 3)
        samples = await scrape(second)
        assert value(samples, "cached_image_entries_by_verdict", verdict="unsafe") == 1
        assert value(samples, "cached_image_entries_by_verdict", verdict="mismatch") == 1
        assert value(samples, "cached_image_entries_by_verdict", verdict="unknown") == 0
        assert value(samples, "cached_image_safety_audits_total") == 2
    finally:
        await stop_daemon(second)


async def test_a_verdict_that_cannot_be_read_is_no_verdict(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """The xattr read fails (the file gone behind the daemon's back, or an ERANGE while a
    concurrent hit's inspection rewrites it): no verdict, not a TypeError out of
    ``Safety.stored`` (which took the OSError the read returns for the value)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    data = make(tmp_path, "clean")
    image = glance.add_image(data, disk_format="qcow2")
    first = await start_daemon(cache, glance.url)
    try:
        await miss_then_hit(first, image.id, data)
    finally:
        await stop_daemon(first)
    second = await start_daemon(cache, glance.url)
    try:
        entry = second.store.get(image.id)
        assert entry is not None
        aside = tmp_path / "aside"
        await asyncio.to_thread(os.rename, entry.path, aside)
        assert await safety_of(second).stored(entry) is None
        await asyncio.to_thread(os.rename, aside, entry.path)
        verdict = await safety_of(second).stored(entry)  # nothing was remembered meanwhile
        assert verdict is not None and verdict.outcome is Outcome.SAFE
    finally:
        await stop_daemon(second)


async def test_without_credentials_an_undeclared_entry_is_judged_but_not_stored(
    glance: FakeGlance, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    data = make(tmp_path, "clean")
    image = glance.add_image(data, disk_format="raw")
    first = await start_daemon(cache, glance.url, image_safety_mode="off")
    try:
        assert (await first.get(image.id))[0] == 200
        await wait_complete(first, image.id)
    finally:
        await stop_daemon(first)
    await as_older_entry(cache / image.id)  # its metadata keeps no declaration either
    second = await start_daemon(cache, glance.url)  # no service credentials
    try:
        safety = safety_of(second)
        result = await safety.audit(second.store.complete_entries, lambda e: False)
        assert (result.inspected, result.undeclared) == (1, 1)
        assert stored_verdict(second, image.id) is None  # declaration unknown: not stored
        # The first hit looks its record up with the caller's token, and stores it: a qcow2
        # declared raw (on its content alone it was "safe").
        status, headers, _ = await second.get(image.id)
        assert (status, headers["Cached-Image-Verdict"]) == (
            200,
            'mismatch; detected="qcow2"; declared="raw"',
        )
        verdict = stored_verdict(second, image.id)
        assert verdict is not None and verdict.outcome is Outcome.MISMATCH
        result = await safety.audit(second.store.complete_entries, lambda e: False)
        assert (result.inspected, result.current, result.undeclared) == (0, 1, 0)
    finally:
        await stop_daemon(second)


async def test_the_declaration_kept_in_the_entry_is_judged_against_without_a_lookup(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """An entry filled with ``off`` keeps its declared formats in ``user.cached.meta``: the
    audit judges it against them and stores the verdict without looking its record up (the
    daemon could: it has service credentials), so a later declaration upstream does not
    change what the fill saw."""
    cache = tmp_path / "cache"
    cache.mkdir()
    data = make(tmp_path, "clean")
    image = glance.add_image(data, disk_format="raw", container_format="bare")
    first = await start_daemon(cache, glance.url, image_safety_mode="off")
    try:
        assert (await first.get(image.id))[0] == 200
        await wait_complete(first, image.id)
    finally:
        await stop_daemon(first)
    meta = json.loads(os.getxattr(cache / image.id, "user.cached.meta"))
    assert (meta["disk_format"], meta["container_format"]) == ("raw", "bare")
    image.disk_format = "qcow2"  # (the record now says otherwise: the entry's is used)
    second = await start_daemon(cache, glance.url, service_token="token-admin")
    try:
        records = record_gets(glance, image.id)
        result = await safety_of(second).audit(second.store.complete_entries, lambda e: False)
        assert (result.inspected, result.undeclared) == (1, 0)
        verdict = stored_verdict(second, image.id)
        assert verdict is not None
        assert (verdict.outcome, verdict.declared, verdict.container) == (
            Outcome.MISMATCH,
            "raw",
            "bare",
        )
        assert record_gets(glance, image.id) == records  # no look-up
    finally:
        await stop_daemon(second)


async def test_an_audit_of_1000_entries_blocks_nothing_on_the_loop(
    glance: FakeGlance, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1,000 entries whose verdicts an older oslo.utils made (a small qcow2 with a backing
    file each, which that version called safe). The audit inspects every one again from its
    file on the store's threads; the loop makes no blocking call (conftest's autouse
    fixture). The time per entry is logged and kept in the result (1-6 ms expected; the
    number is reported, never asserted)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    d = await start_daemon(cache, glance.url)
    try:
        data = make(tmp_path, "backing")
        digest = hashlib.sha512(data).hexdigest()
        old = Verdict(
            Outcome.SAFE, "qcow2", "raw", (), (), 1 << 20, "10.1.0", Policy().fingerprint()
        )
        stale = record.dumps(old)
        ids = sorted(str(uuid.UUID(int=random.Random(7).getrandbits(128) + n)) for n in range(1000))

        def fill(entry: Entry) -> None:
            fd = os.open(entry.path, os.O_WRONLY)
            try:
                os.pwrite(fd, data, 0)
                os.setxattr(fd, record.NAME, stale)  # (before the commit record, as a fill)
            finally:
                os.close(fd)

        for image_id in ids:
            entry = await d.store.create(
                image_id, len(data), checksum=None, os_hash_algo="sha512", os_hash_value=digest
            )
            await d.store.run(fill, entry)
            entry.present.update(range(entry.present.count))
            assert await d.store.commit(entry)
        safety = safety_of(d)
        caplog.set_level(logging.INFO, "cached.safety.audit")
        result = await safety.audit(d.store.complete_entries, lambda e: e.suspect)
        assert (result.entries, result.inspected, result.skipped) == (1000, 1000, 0)
        assert result.ms_per_entry is not None
        print(f"audit: {result.ms_per_entry:.2f} ms per entry (wall), {result.to_json()}")
        assert any("safety audit: 1000 entries" in r.getMessage() for r in caplog.records)
        for image_id in (ids[0], ids[-1]):
            verdict = stored_verdict(d, image_id)
            assert verdict is not None and verdict.checks == ("backing_file",)
        assert all(not e.suspect for e in d.store.complete_entries())
    finally:
        await stop_daemon(d)


# --------------------------------------------------------------------- the admin side
async def test_admin_endpoints_and_an_override_bound_to_the_hash_value(
    glance: FakeGlance, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    data = make(tmp_path, "backing")
    image = glance.add_image(data, disk_format="raw")
    d = await start_daemon(cache, glance.url)
    try:
        await miss_then_hit(d, image.id, data)
        async with d.session.get(f"{d.url}/v2/cache", headers={"X-Auth-Token": "token-admin"}):
            pass
        status, glance_doc = await admin(d, "GET", "/v2/cache")
        assert status == 200 and set(glance_doc) == {"cached_images", "queued_images"}
        status, listing = await admin(d, "GET", "/v2/cache/safety")
        assert status == 200
        assert (listing["oslo_utils"], listing["policy"]) == (VERSION, safety_of(d).fingerprint)
        (row,) = listing["verdicts"]
        assert {k: row[k] for k in ("image_id", "verdict", "current", "detected", "declared")} == {
            "image_id": image.id,
            "verdict": "unsafe",
            "current": True,
            "detected": "qcow2",
            "declared": "raw",
        }
        assert (row["checks"], row["override"], row["overridden"]) == (
            ["backing_file"],
            None,
            False,
        )
        status, shown = await admin(d, "GET", f"/v2/cache/safety/{image.id}")
        assert status == 200 and shown == row
        unknown = str(uuid.uuid4())
        assert (await admin(d, "GET", f"/v2/cache/safety/{unknown}"))[0] == 404
        assert (await admin(d, "GET", "/v2/cache/safety/not-an-id"))[0] == 404
        status, rechecked = await admin(d, "POST", f"/v2/cache/safety/{image.id}/recheck")
        assert status == 200 and rechecked["verdict"] == "unsafe"
        # overrides: bound to the hash value
        assert (await admin(d, "PUT", f"/v2/cache/safety/{image.id}/override", {}))[0] == 400
        caplog.set_level(logging.WARNING, "cached.safety.audit")
        other = "ab" * 64
        status, shown = await admin(
            d, "PUT", f"/v2/cache/safety/{image.id}/override", {"os_hash_value": other}
        )
        assert status == 200 and shown["override"]["os_hash_value"] == other
        assert shown["overridden"] is False  # made for other bytes: does not apply
        assert not safety_of(d).overridden(image.id, image.os_hash_value)
        status, shown = await admin(
            d,
            "PUT",
            f"/v2/cache/safety/{image.id}/override",
            {"os_hash_value": image.os_hash_value, "reason": "vendor image\nforged line"},
        )
        assert status == 200 and shown["overridden"] is True
        assert shown["override"]["reason"] == "vendor image?forged line"
        assert safety_of(d).overridden(image.id, image.os_hash_value)
        assert not safety_of(d).overridden(image.id, other)
        assert any(
            r.levelno == logging.WARNING and "safety override by an admin" in r.getMessage()
            for r in caplog.records
        )
        # an override of an image not cached here is kept and listed too
        status, _ = await admin(
            d, "PUT", f"/v2/cache/safety/{unknown}/override", {"os_hash_value": other}
        )
        assert status == 200
        assert (await admin(d, "GET", f"/v2/cache/safety/{unknown}"))[1]["cached"] is False
        assert (await admin(d, "DELETE", f"/v2/cache/safety/{unknown}/override"))[0] == 204
        assert (await admin(d, "DELETE", f"/v2/cache/safety/{unknown}/override"))[0] == 404
        # an audit from the API
        status, started = await admin(d, "POST", "/v2/cache/safety/audit?every=true")
        assert status == 202
        await wait_until(lambda: safety_of(d).last_audit is not None, "the audit ran")
        assert safety_of(d).last_audit.every  # type: ignore[union-attr]
        # the image API's callers cannot reach any of it
        async with d.session.get(
            f"{d.url}/v2/cache/safety", headers={"X-Auth-Token": "token-p1"}
        ) as resp:
            assert resp.status == 403
    finally:
        await stop_daemon(d)
    assert sorted(os.listdir(cache / "safety-overrides")) == [image.id]
    again = await start_daemon(cache, glance.url)
    try:  # the override survives the restart
        assert safety_of(again).overridden(image.id, image.os_hash_value)
        status, shown = await admin(again, "GET", f"/v2/cache/safety/{image.id}")
        assert (status, shown["overridden"], shown["verdict"]) == (200, True, "unsafe")
    finally:
        await stop_daemon(again)


async def test_safety_endpoints_answer_404_when_inspection_is_off(
    glance: FakeGlance, tmp_path: Path
) -> None:
    d = await start_daemon(tmp_path, glance.url, image_safety_mode="off")
    try:
        status, body = await admin(d, "GET", "/v2/cache/safety")
        assert status == 404 and "image_safety_mode: off" in body
        assert d.app[SCHEDULER].get_job("audit") is None
    finally:
        await stop_daemon(d)


async def test_cached_manage_safety(
    glance: FakeGlance, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    data = make(tmp_path, "backing")
    image = glance.add_image(data, disk_format="raw")
    d = await start_daemon(cache, glance.url)
    try:
        await miss_then_hit(d, image.id, data)
        host = ("-H", d.admin_url)
        assert await ctl(*host, "safety", "list") == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == "Found 1 cached images..."
        cells = [c.strip() for c in lines[4].split("|")[1:-1]]
        assert cells == [image.id, "unsafe", "qcow2", "raw", "backing_file", "-"]
        assert await ctl(*host, "--json", "safety", "show", image.id) == 0
        (row,) = json.loads(capsys.readouterr().out)["verdicts"]
        assert (row["host"], row["verdict"]) == (d.admin_url, "unsafe")
        assert await ctl(*host, "safety", "recheck", image.id) == 0
        assert "  verdict:   unsafe" in capsys.readouterr().out.splitlines()
        assert await ctl(*host, "safety", "override", image.id) == 2  # --hash is required
        capsys.readouterr()
        hash_value = image.os_hash_value or ""
        argv = ("safety", "override", image.id, "--hash", hash_value, "--reason", "ok")
        assert await ctl(*host, *argv, stdin="n\n") == 0  # asked first: nothing done
        assert capsys.readouterr().out == f"Override the verdict of image {image.id}? [y/N] "
        assert safety_of(d).override_of(image.id) is None
        assert await ctl(*host, *argv, stdin="y\n") == 0
        assert "(applies; ok)" in capsys.readouterr().out
        assert safety_of(d).overridden(image.id, hash_value)
        assert await ctl(*host, "-f", "safety", "override", image.id, "--remove") == 0
        assert not safety_of(d).overridden(image.id, hash_value)
        assert await ctl(*host, "-H", d.admin_url, "safety", "audit") == 0  # (one host, once)
        assert capsys.readouterr().out.splitlines()[-1] in (
            "Audit started",
            "An audit is already running",
        )
        assert await ctl(*host, "safety", "show", str(uuid.uuid4())) == 1
        assert "HTTP 404" in capsys.readouterr().err
    finally:
        await stop_daemon(d)


async def test_promtool_checks_the_verdict_metrics(
    daemon: Daemon, glance: FakeGlance, tmp_path: Path
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    data = make(tmp_path, "backing")
    image = glance.add_image(data, disk_format="raw")
    await miss_then_hit(daemon, image.id, data)
    await safety_of(daemon).audit(daemon.store.complete_entries, lambda e: False, every=True)
    async with manage(daemon).get(f"{daemon.admin_base}/metrics") as resp:
        body = await resp.read()
    assert b'cached_image_entries_by_verdict{verdict="unsafe"} 1.0' in body
    assert b"cached_image_safety_audit_duration_seconds_count 1.0" in body
    res = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=body,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()


async def test_cached_manage_safety_on_all_hosts(
    glance: FakeGlance, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make(tmp_path, "clean")
    image = glance.add_image(data, disk_format="raw")  # a qcow2 declared raw
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    token = "sha256:" + hashlib.sha256(b"token-admin").hexdigest()
    a = await start_daemon(tmp_path / "a", glance.url, admin_tokens=[token])
    b = await start_daemon(tmp_path / "b", glance.url, admin_tokens=[token])
    try:
        await miss_then_hit(a, image.id, data)
        conf = tmp_path / "cached.yaml"
        conf.write_text(f"listen: {a.url.removeprefix('http://')}\npeers: [{b.url}]\n")
        argv = ("--all-hosts", "-c", str(conf), "--os-auth-token", "token-admin")
        assert await ctl(*argv, "safety", "list") == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == "Found 1 cached images on 2 hosts..."
        cells = [c.strip() for c in lines[4].split("|")[1:-1]]
        assert cells == [
            a.url.removeprefix("http://"),
            image.id,
            "mismatch",
            "qcow2",
            "raw",
            "-",
            "-",
        ]
        assert await ctl(*argv, "--json", "safety", "show", image.id) == 1  # not cached on b
        answer = json.loads(capsys.readouterr().out)
        assert [(v["host"], v["verdict"]) for v in answer["verdicts"]] == [
            (a.url.removeprefix("http://"), "mismatch")
        ]
        assert [(e["host"], e["status"]) for e in answer["errors"]] == [
            (b.url.removeprefix("http://"), 404)
        ]
    finally:
        await stop_daemon(a)
        await stop_daemon(b)


def test_override_files_are_parsed_strictly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = overrides.Override(str(uuid.uuid4()), "ab" * 64, 1765080000.5, "vendor image")
    overrides.write(tmp_path, good)
    assert overrides.load_all(tmp_path) == {good.image_id: good}
    directory = tmp_path / overrides.DIRNAME
    assert sorted(os.listdir(directory)) == [good.image_id]  # no temporary file left
    assert json.loads((directory / good.image_id).read_bytes()) == {
        "v": 1,
        "image_id": good.image_id,
        "os_hash_value": "ab" * 64,
        "at": 1765080000.5,
        "reason": "vendor image",
    }
    tampered = {
        str(uuid.uuid4()): b"not json",
        str(uuid.uuid4()): overrides.dumps(good),  # another image's file under this name
        str(uuid.uuid4()): b'{"v":1,"image_id":"x","os_hash_value":"zz","at":1,"reason":""}',
    }
    for name, raw in tampered.items():
        (directory / name).write_bytes(raw)
    (directory / ".half-written.tmp").write_bytes(b"{")
    caplog.set_level(logging.WARNING, "cached.safety.overrides")
    assert overrides.load_all(tmp_path) == {good.image_id: good}  # the rest: no override
    assert sum("ignoring the safety override" in r.getMessage() for r in caplog.records) == 3
    assert overrides.remove(tmp_path, good.image_id) is True
    assert overrides.remove(tmp_path, good.image_id) is False
    assert overrides.clean_reason("a\x1b[31mb\nc" + "x" * 300) == "a?[31mb?c" + "x" * 191
