"""Glance image signatures (issue 18, "Optional: signatures"): keys, certificates and
signatures made by ``openssl`` here (as Glance's documentation signs an image:
``openssl dgst -sha256 -sign key.pem -sigopt rsa_padding_mode:pss``), verified by
cached/safety/signature.py with cryptography; then a running daemon in front of the fake
Glance: the result in ``user.cached.signature`` and ``Cached-Image-Signature``, a property
changed by PATCH re-verified from the file.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from cached.safety import signature as sig
from cached.safety.signature import Anchors, Result, SignatureCheck, Signed

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


def test_the_fingerprint_follows_each_property(pki: PKI) -> None:
    props = pki.properties("rsa", DATA)
    base = Signed.of(props).fingerprint()
    for name in sig.PROPERTIES:
        assert Signed.of({**props, name: props[name] + "x"}).fingerprint() != base
    assert Signed.of(dict(props)).fingerprint() == base


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
