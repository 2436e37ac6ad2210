"""Glance image signatures (issue 18, "Optional: signatures"): keys, certificates and
signatures made by ``openssl`` here (as Glance's documentation signs an image:
``openssl dgst -sha256 -sign key.pem -sigopt rsa_padding_mode:pss``), verified by
cached/safety/signature.py with cryptography; then a running daemon in front of the fake
Glance: the result in ``user.cached.signature`` and ``Cached-Image-Signature``, a property
changed by PATCH re-verified from the file.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import (
    Daemon,
    auth,
    start_daemon,
    stop_daemon,
    wait_complete,
    wait_idle,
    wait_until,
)
from daemonproc import CachedProcess, run_cached
from fakeglance import FakeGlance
from scrapes import Delta, scrape

from cached import config as configuration
from cached.errors import ConfigError
from cached.safety import signature as sig
from cached.safety.signature import Anchors, Result, SignatureCheck, Signed
from cached.safety.signatures import Signatures
from cached.upstream import ImageRecord

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def openssl(*args: object, cwd: Path) -> None:
    subprocess.run(
        ["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60
    )


@dataclass
class Signer:
    key: Path
    name: str  # the certificate's uuid (its file in the certificate directory)
    key_type: str


@dataclass
class PKI:
    root: Path
    certs: Path  # image_signature_certificate_dir
    ca_file: Path  # image_signature_ca_file
    signers: dict[str, Signer]

    def sign(self, signer: str, data: bytes, method: str = "SHA-256") -> str:
        s = self.signers[signer]
        image = self.root / f"data-{uuid.uuid4().hex[:8]}"
        image.write_bytes(data)
        out = image.with_suffix(".sig")
        digest = "-" + method.replace("-", "").lower()
        pss = ["-sigopt", "rsa_padding_mode:pss"] if s.key_type == "RSA-PSS" else []
        openssl("dgst", digest, "-sign", s.key, *pss, "-out", out, image, cwd=self.root)
        return base64.b64encode(out.read_bytes()).decode()

    def properties(self, signer: str, data: bytes, method: str = "SHA-256") -> dict[str, str]:
        s = self.signers[signer]
        return {
            sig.SIGNATURE: self.sign(signer, data, method),
            sig.HASH_METHOD: method,
            sig.KEY_TYPE: s.key_type,
            sig.CERTIFICATE: s.name,
        }

    def anchors(self) -> Anchors:
        return Anchors.load(self.certs, self.ca_file)


def _issue(root: Path, key: Path, cn: str, ca: str, days: int, ext: str | None = None) -> Path:
    openssl("req", "-new", "-key", key, "-subj", f"/CN={cn}", "-out", f"{cn}.csr", cwd=root)
    extra = ["-extfile", ext] if ext else []
    openssl(
        "x509", "-req", "-in", f"{cn}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", days, "-out", f"{cn}.pem", *extra, cwd=root,
    )  # fmt: skip
    return root / f"{cn}.pem"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A root CA (the bundle), an intermediate CA, and signers: RSA (PSS), ECDSA P-384 and
    P-521, DSA; one signer under the intermediate, one expired, one from another CA."""
    root = tmp_path_factory.mktemp("pki")
    certs = root / "certs"
    certs.mkdir()
    for ca in ("ca", "other-ca"):
        openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
            "-out", f"{ca}.pem", "-days", 30, "-subj", f"/CN={ca}", cwd=root,
        )  # fmt: skip
    keys = {
        "rsa": ("-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"),
        "p384": ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"),
        "p521": ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-521"),
    }
    for name, options in keys.items():
        openssl("genpkey", *options, "-out", f"{name}.key", cwd=root)
    openssl(
        "genpkey", "-genparam", "-algorithm", "DSA", "-pkeyopt", "dsa_paramgen_bits:2048",
        "-out", "dsa.param", cwd=root,
    )  # fmt: skip
    openssl("genpkey", "-paramfile", "dsa.param", "-out", "dsa.key", cwd=root)
    (root / "ca.ext").write_text("basicConstraints=critical,CA:TRUE\nkeyUsage=keyCertSign\n")
    openssl("genpkey", *keys["rsa"], "-out", "inter.key", cwd=root)
    _issue(root, root / "inter.key", "inter", "ca", 30, "ca.ext")
    signers: dict[str, Signer] = {}

    def signer(name: str, key: str, key_type: str, ca: str = "ca", days: int = 30) -> None:
        cert_id = str(uuid.uuid4())
        pem = _issue(root, root / f"{key}.key", f"{name}-signer", ca, days)
        shutil.copy(pem, certs / f"{cert_id}.pem")
        signers[name] = Signer(root / f"{key}.key", cert_id, key_type)

    signer("rsa", "rsa", "RSA-PSS")
    signer("p384", "p384", "ECC_SECP384R1")
    signer("p521", "p521", "ECC_SECP521R1")
    signer("dsa", "dsa", "DSA")
    signer("chained", "p384", "ECC_SECP384R1", ca="inter")
    signer("expired", "rsa", "RSA-PSS", days=-1)  # notAfter a day before now
    signer("foreign", "rsa", "RSA-PSS", ca="other-ca")
    bundle = root / "bundle.pem"
    bundle.write_bytes((root / "ca.pem").read_bytes() + (root / "inter.pem").read_bytes())
    return PKI(root, certs, bundle, signers)


DATA = os.urandom(200_000)


def check(pki: PKI, props: dict[str, str], data: bytes = DATA) -> sig.Check:
    signed = Signed.of(props)
    name = signed.hash_name
    digest = hashlib.new(name, data).digest() if name else None
    return sig.verify(signed, digest, pki.anchors())


@pytest.mark.parametrize("signer", ["rsa", "p384", "p521", "dsa", "chained"])
@pytest.mark.parametrize("method", ["SHA-256", "SHA-512"])
def test_good_signatures_verify(pki: PKI, signer: str, method: str) -> None:
    result = check(pki, pki.properties(signer, DATA, method))
    assert (result.result, result.reason) == (Result.VERIFIED, "")
    assert result.until is not None and result.until > time.time()


@pytest.mark.parametrize("method", ["SHA-224", "SHA-384"])
def test_every_glance_hash_method(pki: PKI, method: str) -> None:
    assert check(pki, pki.properties("rsa", DATA, method)).result is Result.VERIFIED


@pytest.mark.parametrize("signer", ["rsa", "p384", "dsa"])
def test_other_data_is_a_bad_signature(pki: PKI, signer: str) -> None:
    props = pki.properties(signer, DATA)
    assert check(pki, props, DATA[:-1] + b"!").result is Result.BAD_SIGNATURE


def test_a_signature_of_other_data_is_bad(pki: PKI) -> None:
    props = pki.properties("rsa", DATA)
    props[sig.SIGNATURE] = pki.sign("rsa", b"other data")
    assert check(pki, props).result is Result.BAD_SIGNATURE


def test_expired_certificate(pki: PKI) -> None:
    result = check(pki, pki.properties("expired", DATA))
    assert result.result is Result.EXPIRED_CERTIFICATE
    assert "expired" in result.reason


def test_a_verified_result_holds_until_the_chain_expires(pki: PKI) -> None:
    props = pki.properties("rsa", DATA)
    signed = Signed.of(props)
    digest = hashlib.sha256(DATA).digest()
    good = sig.verify(signed, digest, pki.anchors())
    assert good.until is not None
    assert good.current(signed.fingerprint(), pki.anchors().fingerprint, time.time())
    assert not good.current(signed.fingerprint(), pki.anchors().fingerprint, good.until + 1)
    later = sig.verify(signed, digest, pki.anchors(), now=good.until + 1)
    assert later.result is Result.EXPIRED_CERTIFICATE


@pytest.mark.parametrize(
    ("change", "result"),
    [
        ({sig.CERTIFICATE: str(uuid.uuid4())}, Result.UNKNOWN_CERTIFICATE),
        ({sig.CERTIFICATE: "../../etc/passwd"}, Result.UNKNOWN_CERTIFICATE),
        ({sig.KEY_TYPE: "ECC_SECT571K1"}, Result.UNKNOWN_KEY_TYPE),  # gone from cryptography 47
        ({sig.KEY_TYPE: "ECC_SECT409R1"}, Result.UNKNOWN_KEY_TYPE),
        ({sig.KEY_TYPE: "RSA-PKCS1"}, Result.UNKNOWN_KEY_TYPE),
        ({sig.KEY_TYPE: "DSA"}, Result.BAD_SIGNATURE),  # an RSA certificate
        ({sig.SIGNATURE: "not base64!"}, Result.BAD_SIGNATURE),
        ({sig.HASH_METHOD: "MD5"}, Result.ERROR),
        ({sig.HASH_METHOD: None}, Result.ERROR),  # incomplete
    ],
)
def test_refusals(pki: PKI, change: dict[str, str | None], result: Result) -> None:
    props: dict[str, str | None] = {**pki.properties("rsa", DATA), **change}
    found = check(pki, {k: v for k, v in props.items() if v is not None})
    assert found.result is result, found.reason


def test_a_certificate_from_another_ca_is_unknown(pki: PKI) -> None:
    result = check(pki, pki.properties("foreign", DATA))
    assert result.result is Result.UNKNOWN_CERTIFICATE
    assert "does not chain" in result.reason


def test_unsigned(pki: PKI) -> None:
    result = sig.verify(Signed.of({"name": "x"}), None, pki.anchors())
    assert result.result is Result.UNSIGNED


def test_allows() -> None:
    assert SignatureCheck.allows(Result.VERIFIED, required=True)
    assert SignatureCheck.allows(Result.UNSIGNED, required=False)
    assert not SignatureCheck.allows(Result.UNSIGNED, required=True)
    for bad in set(Result) - {Result.VERIFIED, Result.UNSIGNED}:
        assert not SignatureCheck.allows(bad, required=False)


def test_anchors_errors_name_the_option(tmp_path: Path, pki: PKI) -> None:
    with pytest.raises(ValueError, match="image_signature_certificate_dir"):
        Anchors.load(tmp_path / "absent", pki.ca_file)
    with pytest.raises(ValueError, match="image_signature_ca_file"):
        Anchors.load(pki.certs, tmp_path / "absent.pem")
    (tmp_path / "empty.pem").write_text("nothing\n")
    with pytest.raises(ValueError, match="image_signature_ca_file"):
        Anchors.load(pki.certs, tmp_path / "empty.pem")


def test_the_anchors_fingerprint_follows_the_certificate_files(tmp_path: Path, pki: PKI) -> None:
    """A certificate added (and the daemon restarted) makes stored results stale: an image
    found ``unknown-certificate`` is verified again on its next hit."""
    certs = tmp_path / "certs"
    shutil.copytree(pki.certs, certs)
    before = Anchors.load(certs, pki.ca_file).fingerprint
    assert Anchors.load(certs, pki.ca_file).fingerprint == before
    shutil.copy(certs / f"{pki.signers['rsa'].name}.pem", certs / f"{uuid.uuid4()}.pem")
    assert Anchors.load(certs, pki.ca_file).fingerprint != before


def test_the_fingerprint_follows_each_property(pki: PKI) -> None:
    props = pki.properties("rsa", DATA)
    base = Signed.of(props).fingerprint()
    for name in sig.PROPERTIES:
        assert Signed.of({**props, name: props[name] + "x"}).fingerprint() != base
    assert Signed.of(dict(props)).fingerprint() == base
    absent, text = Signed.of({sig.SIGNATURE: None}), Signed.of({sig.SIGNATURE: "None"})
    assert absent.fingerprint() != text.fingerprint()


def test_record_round_trip_and_strict_parsing(pki: PKI) -> None:
    good = check(pki, pki.properties("rsa", DATA))
    raw = sig.dumps(good)
    assert len(raw) <= sig.MAX_LEN
    back = sig.loads(raw)
    assert (back.result, back.fingerprint, back.anchors, back.until) == (
        good.result, good.fingerprint, good.anchors, good.until,
    )  # fmt: skip
    bad = sig.verify(Signed.of({sig.SIGNATURE: "x"}), None, pki.anchors())
    assert sig.loads(sig.dumps(bad)).result is Result.ERROR
    for tampered in [
        b'{"v":1,"result":"verified"}',
        raw.replace(b'"verified"', b'"trusted"'),
        raw.replace(b'"v":1', b'"v":2'),
        raw[:-1] + b',"x":1}',
        raw.replace(b'"until":', b'"until":"'),
        sig.dumps(bad).replace(b'"until":null', b'"until":1'),
        b"[" * 300,
        b"\xff",
    ]:
        with pytest.raises(ValueError):
            sig.loads(tampered)


# --- a running daemon --------------------------------------------------------------------
MiB = 1 << 20
HIT = "cached; hit"
MISS = "cached; fwd=uri-miss; stored"


def signing_options(pki: PKI, **more: object) -> dict[str, object]:
    return {
        "image_signature_verify": True,
        "image_signature_certificate_dir": str(pki.certs),
        "image_signature_ca_file": str(pki.ca_file),
        **more,
    }


@pytest.fixture
async def signing(glance: FakeGlance, tmp_path: Path, pki: PKI) -> AsyncIterator[Daemon]:
    cache = tmp_path / "cache"
    cache.mkdir()
    daemon = await start_daemon(
        cache, glance.url, **signing_options(pki, image_signature_required=True)
    )
    yield daemon
    await stop_daemon(daemon)


def stored(daemon: Daemon, image_id: str) -> sig.Check | None:
    path = daemon.cache_dir / image_id
    if sig.NAME not in os.listxattr(path):
        return None
    return sig.loads(os.getxattr(path, sig.NAME))


async def miss_then_hit(daemon: Daemon, image_id: str, data: bytes) -> dict[str, str]:
    status, headers, body = await daemon.get(image_id)
    assert (status, headers["Cache-Status"], body == data) == (200, MISS, True)
    assert "Cached-Image-Signature" not in headers  # decided at the end of the fill
    await wait_complete(daemon, image_id)
    return await hit(daemon, image_id, data)


async def hit(daemon: Daemon, image_id: str, data: bytes) -> dict[str, str]:
    status, headers, body = await daemon.get(image_id)
    assert (status, headers["Cache-Status"], body == data) == (200, HIT, True)
    entry = daemon.store.get(image_id)
    assert entry is not None and not entry.suspect  # the commit record covers the xattr
    return headers


@pytest.mark.parametrize(
    ("signer", "method", "change", "result"),
    [
        ("rsa", "SHA-512", {}, Result.VERIFIED),  # os_hash_algo's method: the digest reused
        ("p384", "SHA-256", {}, Result.VERIFIED),  # another: one more consumer
        ("p521", "SHA-384", {}, Result.VERIFIED),
        ("dsa", "SHA-256", {}, Result.VERIFIED),
        ("rsa", "SHA-512", {"bad": True}, Result.BAD_SIGNATURE),
        ("expired", "SHA-256", {}, Result.EXPIRED_CERTIFICATE),
        ("foreign", "SHA-256", {}, Result.UNKNOWN_CERTIFICATE),
        ("rsa", "SHA-256", {sig.CERTIFICATE: str(uuid.uuid4())}, Result.UNKNOWN_CERTIFICATE),
        ("p384", "SHA-256", {sig.KEY_TYPE: "ECC_SECT571R1"}, Result.UNKNOWN_KEY_TYPE),
        (None, None, {}, Result.UNSIGNED),  # required: a failure, still served (audit)
    ],
)
async def test_checked_as_cached_stored_and_sent_on_hits(
    signing: Daemon,
    glance: FakeGlance,
    pki: PKI,
    signer: str | None,
    method: str | None,
    change: dict[str, object],
    result: Result,
) -> None:
    data = os.urandom(3 * MiB + 17)
    props: dict[str, object] = {}
    if signer is not None and method is not None:
        props = {**pki.properties(signer, data, method), **change}
        if props.pop("bad", False):
            props[sig.SIGNATURE] = pki.sign(signer, data + b"x", method)
    image = glance.add_image(data, properties=props)
    before = await scrape(signing)
    headers = await miss_then_hit(signing, image.id, data)
    assert headers["Cached-Image-Signature"] == result.value
    assert headers["Cached-Image-Verdict"].startswith("safe")  # beside the content verdict
    checks = Delta(before, await scrape(signing))
    assert checks("cached_image_signatures_total", result=result.value) == 1
    assert sum(checks("cached_image_signatures_total", result=r.value) for r in Result) == 1
    found = stored(signing, image.id)
    assert found is not None and found.result is result
    assert found.fingerprint == Signed.of(props).fingerprint()


async def test_a_range_fill_then_the_rest_catches_the_extra_hash_up(
    signing: Daemon, glance: FakeGlance, pki: PKI
) -> None:
    """SHA-256 (not os_hash_algo): the extra consumer misses the first chunk, fetched by a
    range fill, and reads it back from the file before the commit."""
    data = os.urandom(9 * MiB)
    image = glance.add_image(data, properties=pki.properties("p384", data, "SHA-256"))
    status, _, body = await signing.get(image.id, Range="bytes=0-99")
    assert (status, body) == (206, data[:100])
    await wait_idle(signing, image.id)
    status, _, body = await signing.get(image.id)
    assert (status, body == data) == (200, True)
    await wait_complete(signing, image.id)
    headers = await hit(signing, image.id, data)
    assert headers["Cached-Image-Signature"] == "verified"


@pytest.mark.parametrize("method", ["SHA-512", "SHA-256"])
async def test_a_property_changed_by_patch_is_verified_again(
    signing: Daemon, glance: FakeGlance, pki: PKI, method: str
) -> None:
    data = os.urandom(2 * MiB)
    image = glance.add_image(data, properties=pki.properties("rsa", data, method))
    assert (await miss_then_hit(signing, image.id, data))["Cached-Image-Signature"] == "verified"

    async def patch(name: str, value: str) -> None:
        async with signing.session.patch(
            f"{signing.url}/v2/images/{image.id}",
            json=[{"op": "replace", "path": f"/{name}", "value": value}],
            headers={**auth(), "Content-Type": "application/openstack-images-v2.1-json-patch"},
        ) as resp:
            assert resp.status == 200, await resp.text()

    good = image.properties[sig.SIGNATURE]
    await patch(sig.SIGNATURE, pki.sign("rsa", b"something else", method))
    before = await scrape(signing)
    headers = await hit(signing, image.id, data)  # the file stays; only the result changes
    assert headers["Cached-Image-Signature"] == "bad-signature"
    assert (
        Delta(before, await scrape(signing))(
            "cached_image_signatures_total", result="bad-signature"
        )
        == 1
    )
    found = stored(signing, image.id)
    assert found is not None and found.result is Result.BAD_SIGNATURE
    # the next hit takes the result it has (no record asked for)
    records = len([r for r in glance.requests if r.path == f"/v2/images/{image.id}"])
    assert (await hit(signing, image.id, data))["Cached-Image-Signature"] == "bad-signature"
    assert records == len([r for r in glance.requests if r.path == f"/v2/images/{image.id}"])
    await patch(sig.SIGNATURE, good)
    assert (await hit(signing, image.id, data))["Cached-Image-Signature"] == "verified"


async def test_results_survive_a_restart_and_a_tampered_one_is_verified_again(
    glance: FakeGlance, tmp_path: Path, pki: PKI
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    data = os.urandom(MiB)
    image = glance.add_image(data, properties=pki.properties("p384", data, "SHA-512"))
    first = await start_daemon(cache, glance.url, **signing_options(pki))
    try:
        assert (await miss_then_hit(first, image.id, data))["Cached-Image-Signature"] == (
            "verified"
        )
    finally:
        await stop_daemon(first)
    # a tamper that claims a result (and breaks the commit record: re-verified by digest)
    os.setxattr(cache / image.id, sig.NAME, b'{"v":1,"result":"verified"}')
    image.properties[sig.SIGNATURE] = pki.sign("p384", b"other", "SHA-512")
    second = await start_daemon(cache, glance.url, **signing_options(pki))
    try:
        status, headers, body = await second.get(image.id)
        assert (status, body == data) == (200, True)
        assert headers["Cached-Image-Signature"] == "bad-signature"
        found = stored(second, image.id)
        assert found is not None and found.result is Result.BAD_SIGNATURE
    finally:
        await stop_daemon(second)


async def test_verification_off_stores_and_sends_nothing(
    daemon: Daemon, glance: FakeGlance, pki: PKI
) -> None:
    data = os.urandom(MiB)
    image = glance.add_image(data, properties=pki.properties("rsa", data, "SHA-256"))
    headers = await miss_then_hit(daemon, image.id, data)
    assert "Cached-Image-Signature" not in headers
    assert stored(daemon, image.id) is None


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"image_signature_verify": True}, "image_signature_certificate_dir"),
        (
            {"image_signature_verify": True, "image_signature_certificate_dir": "/nonexistent"},
            "image_signature_ca_file",
        ),
        ({"image_signature_required": True}, "image_signature_required"),
    ],
)
def test_verification_without_anchors_does_not_start(options: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=f"option '{key}'"):
        configuration.build({"upstream": "http://127.0.0.1:1", **options})


def test_check_config_loads_the_anchors(tmp_path: Path, pki: PKI) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    conf = tmp_path / "cached.yaml"
    good = {**signing_options(pki), "image_cache_dir": str(cache), "upstream": "http://127.0.0.1:1"}
    conf.write_text(yaml.safe_dump(good))
    res = run_cached("check-config", "-q", "-c", str(conf))
    assert res.returncode == 0, res.stderr
    conf.write_text(yaml.safe_dump({**good, "image_signature_ca_file": str(tmp_path / "no.pem")}))
    res = run_cached("check-config", "-q", "-c", str(conf))
    assert res.returncode == 2
    assert "option 'image_signature_ca_file': cannot read" in res.stderr
    conf.write_text(yaml.safe_dump({**good, "image_signature_certificate_dir": ""}))
    res = run_cached("check-config", "-q", "-c", str(conf))
    assert (res.returncode, "option 'image_signature_certificate_dir'" in res.stderr) == (2, True)


async def test_a_daemon_process_logs_and_sends_the_result(
    glance: FakeGlance, tmp_path: Path, pki: PKI
) -> None:
    """``cached serve`` as a real subprocess, anchors from its configuration file."""
    data = os.urandom(MiB)
    props = pki.properties("rsa", data, "SHA-256")
    props[sig.SIGNATURE] = pki.sign("rsa", b"tampered", "SHA-256")
    image = glance.add_image(data, properties=props)
    conf = tmp_path / "cached.yaml"
    conf.write_text(yaml.safe_dump(signing_options(pki)))
    cache = tmp_path / "cache"
    proc = CachedProcess(glance.url, cache, tmp_path / "cached.log", "-c", str(conf))
    await asyncio.to_thread(proc.start)
    try:
        async with aiohttp.ClientSession() as session:
            file_url = f"{proc.url}/v2/images/{image.id}/file"
            async with session.get(file_url, headers=auth()) as resp:
                assert (resp.status, await resp.read() == data) == (200, True)
            await wait_until(lambda: (cache / image.id).exists(), "the entry is committed")
            async with session.get(file_url, headers=auth()) as resp:
                assert (resp.status, resp.headers["Cache-Status"]) == (200, HIT)
                assert resp.headers["Cached-Image-Signature"] == "bad-signature"
                assert await resp.read() == data
        found = sig.loads(os.getxattr(cache / image.id, sig.NAME))
        assert found.result is Result.BAD_SIGNATURE
        assert (
            f"image {image.id} signature bad-signature (certificate "
            f"{pki.signers['rsa'].name}): the signature does not verify" in proc.output()
        )
    finally:
        await asyncio.to_thread(proc.stop)


def test_the_daemon_predicate_fails_closed(pki: PKI) -> None:
    async def run(*_: object) -> None:
        raise AssertionError("not called")

    required = Signatures(pki.anchors(), required=True, run=run)
    optional = Signatures(pki.anchors(), required=False, run=run)
    unsigned = sig.verify(Signed(), None, pki.anchors())
    assert (required.allows(unsigned), optional.allows(unsigned)) == (False, True)
    assert not optional.allows(None)
    verified = check(pki, pki.properties("rsa", DATA))
    assert required.allows(verified) and optional.allows(verified)


def test_serve_without_readable_anchors_exits_naming_the_key(tmp_path: Path, pki: PKI) -> None:
    """Checked before anything is opened: no session left unclosed on the way out."""
    cache = tmp_path / "cache"
    cache.mkdir()
    conf = tmp_path / "cached.yaml"
    options = {
        **signing_options(pki),
        "image_signature_ca_file": str(tmp_path / "absent.pem"),
        "image_cache_dir": str(cache),
        "upstream": "http://127.0.0.1:9",
        "listen": "127.0.0.1:0",
    }
    conf.write_text(yaml.safe_dump(options))
    res = run_cached("serve", "-c", str(conf))
    assert res.returncode == 2, res.stderr
    assert "configuration error: option 'image_signature_ca_file': cannot read" in res.stderr
    assert "Unclosed" not in res.stderr


async def test_a_record_at_hand_with_other_properties_is_verified_again(
    signing: Daemon, glance: FakeGlance, pki: PKI
) -> None:
    """The predicate enforce mode uses: a record whose properties differ from those the
    stored result was made for is verified again from the file, without asking the upstream;
    the same properties are answered from memory."""
    data = os.urandom(MiB)
    image = glance.add_image(data, properties=pki.properties("p521", data, "SHA-512"))
    await miss_then_hit(signing, image.id, data)
    signatures = signing.proxy.signatures
    assert signatures is not None
    entry = signing.store.get(image.id)
    assert entry is not None

    async def no_fetch() -> None:
        raise AssertionError("the record was at hand")

    same = ImageRecord.from_json(image.record())
    found = await signatures.check_for(entry, same, no_fetch)
    assert found is not None and signatures.allows(found)
    image.properties[sig.SIGNATURE] = pki.sign("p521", b"else", "SHA-512")
    other = ImageRecord.from_json(image.record())
    found = await signatures.check_for(entry, other, no_fetch)
    assert found is not None and found.result is Result.BAD_SIGNATURE
    assert not signatures.allows(found)
    again = stored(signing, image.id)
    assert again is not None and again.result is Result.BAD_SIGNATURE
    assert not entry.suspect  # re-recorded with the commit record
