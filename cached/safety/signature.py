"""Glance image signatures, verified with ``cryptography`` as cursive verifies them (issue 18,
"Optional: signatures"), against X.509 anchors the operator keeps on the node instead of
Barbican.

The image properties (Glance's, set by whoever signed the image; cursive's names):

- ``img_signature``: the signature, base64;
- ``img_signature_hash_method``: ``SHA-224``, ``SHA-256``, ``SHA-384`` or ``SHA-512``;
- ``img_signature_key_type``: ``RSA-PSS``, ``DSA``, ``ECC_SECP384R1`` or ``ECC_SECP521R1``
  (``ECC_SECT*`` binary curves are gone from cryptography >= 47; cursive 0.3.1 no longer
  registers them either: ``unknown-key-type``);
- ``img_signature_certificate_uuid``: names the signer's certificate: here the file
  ``<image_signature_certificate_dir>/<uuid>.pem``.

What is signed is the image data, hashed with the hash method: cursive hashes the stream and
verifies the digest *prehashed* (``utils.Prehashed``), so the signature is what
``openssl dgst -sha256 -sign key.pem -sigopt rsa_padding_mode:pss image`` makes. RSA-PSS
uses MGF1 with the same hash and the maximum salt length (``PSS.MAX_LENGTH``); DSA and ECDSA
signatures are DER. Here the digest comes from the fill: the fill's own :class:`Digest` when
the hash method is the record's ``os_hash_algo`` (no extra cost), else one more stream
consumer (:mod:`cached.safety.signatures`).

The certificate must chain to a certificate of the CA bundle (``image_signature_ca_file``),
every link signed by the next (``verify_directly_issued_by``), every issuer a CA (basic
constraints), and the whole chain valid at the time of the check (else
``expired-certificate``). A certificate of the bundle itself is its own anchor.

Results (:class:`Result`): ``verified``, ``unsigned`` (no signature property at all),
``bad-signature`` (the signature does not verify, is not base64, or the certificate's key is
not of the declared type), ``unknown-certificate`` (no such file, or it does not chain to the
bundle), ``expired-certificate``, ``unknown-key-type``, ``error`` (an incomplete set of
properties, an unknown hash method, an unreadable certificate file, anything unexpected).
:meth:`SignatureCheck.allows` says whether a result lets an image be a hit (enforce mode).

The ``user.cached.signature`` xattr (:func:`dumps`/:func:`loads`, at most 256 bytes, parsed
strictly: anything else means "verify again") keeps a result with the fingerprint of the four
properties it was made for, the fingerprint of the anchors (the CA bundle and the certificate
files as the daemon loaded them at start: adding or replacing a certificate takes effect at
the next start, and every entry is verified again on its next hit), and the end of the
chain's validity.

No shared state: :class:`Anchors` is immutable once loaded. Everything here may block (it
reads certificate files): call it from a worker thread, never from the event loop.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import enum
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, padding, rsa, utils

from cached.store import codec

SIGNATURE = "img_signature"
HASH_METHOD = "img_signature_hash_method"
KEY_TYPE = "img_signature_key_type"
CERTIFICATE = "img_signature_certificate_uuid"
PROPERTIES = (SIGNATURE, HASH_METHOD, KEY_TYPE, CERTIFICATE)

# Glance's hash method names -> (hashlib's name, cryptography's algorithm)
HASH_METHODS: dict[str, tuple[str, type[hashes.HashAlgorithm]]] = {
    "SHA-224": ("sha224", hashes.SHA224),
    "SHA-256": ("sha256", hashes.SHA256),
    "SHA-384": ("sha384", hashes.SHA384),
    "SHA-512": ("sha512", hashes.SHA512),
}
# Key types verified here; cursive's ECC_SECT* types are not (see the module docstring).
KEY_TYPES = ("RSA-PSS", "DSA", "ECC_SECP384R1", "ECC_SECP521R1")
_CURVES = {"ECC_SECP384R1": ec.SECP384R1, "ECC_SECP521R1": ec.SECP521R1}
# What may name a certificate file: Barbican's UUIDs and plain names, never a path.
CERTIFICATE_NAME = re.compile(r"[0-9A-Za-z][0-9A-Za-z_-]{0,127}")
MAX_CHAIN = 8  # certificates between a signer and its anchor, at most
MAX_SIGNATURE = 16 << 10  # base64 characters (an RSA-16384 signature is ~2.8 KiB)


class Result(enum.Enum):
    VERIFIED = "verified"
    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad-signature"
    UNKNOWN_CERTIFICATE = "unknown-certificate"
    EXPIRED_CERTIFICATE = "expired-certificate"
    UNKNOWN_KEY_TYPE = "unknown-key-type"
    ERROR = "error"


# What each result means, for enforce's 403 (``Image <id> is refused by the image cache: its
# signature is bad-signature (the signature does not verify).``) and log lines.
MEANINGS = {
    Result.VERIFIED: "it verifies",
    Result.UNSIGNED: "the image is not signed and signatures are required",
    Result.BAD_SIGNATURE: "the signature does not verify",
    Result.UNKNOWN_CERTIFICATE: "its certificate is unknown here or does not chain to a trusted CA",
    Result.EXPIRED_CERTIFICATE: "its certificate chain is not valid now",
    Result.UNKNOWN_KEY_TYPE: "its key type is not supported",
    Result.ERROR: "it cannot be checked",
}


class SignatureCheck:
    """The rule enforce mode applies to a result (audit mode only logs and sends it)."""

    @staticmethod
    def allows(result: Result, required: bool) -> bool:
        """Whether an image with this signature ``result`` may be a hit.

        A signed image must verify, whatever ``required`` (``image_signature_required``)
        says; an unsigned one is allowed unless signatures are required. Any other result
        (a bad or unverifiable signature, an error) is refused.
        """
        return result is Result.VERIFIED or (result is Result.UNSIGNED and not required)


@dataclass(frozen=True)
class Check:
    """The outcome of verifying one image's signature."""

    result: Result
    reason: str  # for the log; "" when verified or unsigned
    fingerprint: str  # of the signature properties checked (:meth:`Signed.fingerprint`)
    anchors: str  # of the anchors used (:attr:`Anchors.fingerprint`)
    until: int | None = None  # verified: the chain is valid until then (Unix seconds)

    def current(self, fingerprint: str, anchors: str, now: float) -> bool:
        """Whether this check still holds for these properties and anchors at ``now``."""
        return (
            self.fingerprint == fingerprint
            and self.anchors == anchors
            and (self.until is None or now < self.until)
        )


@dataclass(frozen=True)
class Signed:
    """The signature properties of an image (None: absent)."""

    signature: object = None
    hash_method: object = None
    key_type: object = None
    certificate: object = None

    @classmethod
    def of(cls, properties: Mapping[str, Any]) -> Signed:
        """The four properties from an image record (``ImageRecord.raw``)."""
        return cls(*(properties.get(name) for name in PROPERTIES))

    @property
    def values(self) -> tuple[object, ...]:
        return (self.signature, self.hash_method, self.key_type, self.certificate)

    @property
    def unsigned(self) -> bool:
        return all(v is None for v in self.values)

    @property
    def hash_name(self) -> str | None:
        """hashlib's name of the hash method, None if it is not one of Glance's."""
        method = HASH_METHODS.get(self.hash_method) if isinstance(self.hash_method, str) else None
        return method[0] if method is not None else None

    def fingerprint(self) -> str:
        """16 hex digits identifying the four values (a change means verify again)."""
        doc = dict(zip(PROPERTIES, self.values, strict=True))
        try:
            raw = codec.dumps(doc)  # JSON values, as the record had them (None is null)
        except (TypeError, ValueError):
            raw = repr(sorted(doc.items())).encode()
        return hashlib.sha256(raw).hexdigest()[:16]


class _Refused(Exception):
    def __init__(self, result: Result, reason: str):
        super().__init__(reason)
        self.result = result
        self.reason = reason


class Anchors:
    """The certificates signatures are checked against: a directory of ``<uuid>.pem`` files
    and a CA bundle they must chain to. Immutable; methods block (file reads)."""

    def __init__(self, certificate_dir: Path, authorities: list[x509.Certificate], digest: str):
        self.certificate_dir = certificate_dir
        self.authorities = authorities
        # 8 hex digits: of the bundle, the directory's path and its certificate files (name,
        # size, mtime) as loaded: results stored under other anchors are verified again.
        self.fingerprint = digest

    @classmethod
    def load(cls, certificate_dir: str | Path, ca_file: str | Path) -> Anchors:
        """Read the CA bundle. Blocking.

        Raises:
            ValueError: naming the option (``image_signature_ca_file``,
                ``image_signature_certificate_dir``) and what is wrong with it.
        """
        directory = Path(certificate_dir)
        if not directory.is_dir():
            raise ValueError(
                f"option 'image_signature_certificate_dir': {directory} is not a directory"
            )
        try:
            pem = Path(ca_file).read_bytes()
        except OSError as exc:
            raise ValueError(
                f"option 'image_signature_ca_file': cannot read {ca_file}: {exc.strerror or exc}"
            ) from None
        try:
            authorities = x509.load_pem_x509_certificates(pem)
        except ValueError as exc:
            raise ValueError(
                f"option 'image_signature_ca_file': {ca_file} holds no PEM certificates ({exc})"
            ) from None
        h = hashlib.sha256(pem + b"\0" + str(directory.resolve()).encode())
        try:
            for path in sorted(directory.glob("*.pem")):
                st = path.stat()
                h.update(f"\0{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError as exc:
            raise ValueError(
                f"option 'image_signature_certificate_dir': cannot list {directory}: "
                f"{exc.strerror or exc}"
            ) from None
        return cls(directory, authorities, h.hexdigest()[:8])

    def certificate(self, name: str, now: datetime.datetime) -> tuple[x509.Certificate, int]:
        """The signer's certificate ``name``, checked: chained to the bundle and valid at
        ``now``; with the end of the chain's validity (Unix seconds).

        Raises:
            _Refused: ``unknown-certificate``, ``expired-certificate`` or ``error``.
        """
        if not CERTIFICATE_NAME.fullmatch(name):
            raise _Refused(Result.UNKNOWN_CERTIFICATE, "certificate uuid is not a plain name")
        path = self.certificate_dir / f"{name}.pem"
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            raise _Refused(Result.UNKNOWN_CERTIFICATE, f"no certificate {path}") from None
        except OSError as exc:
            raise _Refused(Result.ERROR, f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            leaf = x509.load_pem_x509_certificate(pem)
        except ValueError as exc:
            raise _Refused(Result.ERROR, f"{path} is not a PEM certificate: {exc}") from None
        chain = self._chain(leaf, now)
        until = min(c.not_valid_after_utc for c in chain)
        return leaf, int(until.timestamp())

    def _chain(self, leaf: x509.Certificate, now: datetime.datetime) -> list[x509.Certificate]:
        """``leaf`` and its issuers up to a certificate of the bundle, each valid at ``now``."""
        chain = [leaf]
        current = leaf
        for _ in range(MAX_CHAIN):
            _valid_at(current, now)
            if current in self.authorities:
                return chain  # an anchor (the leaf itself may be one)
            issuer = self._issuer_of(current)
            if issuer is None:
                raise _Refused(
                    Result.UNKNOWN_CERTIFICATE,
                    f"{_subject(current)} does not chain to image_signature_ca_file",
                )
            chain.append(issuer)
            current = issuer
        raise _Refused(Result.UNKNOWN_CERTIFICATE, f"chain longer than {MAX_CHAIN}")

    def _issuer_of(self, cert: x509.Certificate) -> x509.Certificate | None:
        for candidate in self.authorities:
            if candidate.subject != cert.issuer or not _is_ca(candidate):
                continue
            try:
                cert.verify_directly_issued_by(candidate)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return candidate
        return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return constraints.ca


def _valid_at(cert: x509.Certificate, now: datetime.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise _Refused(
            Result.EXPIRED_CERTIFICATE,
            f"{_subject(cert)} is not valid before {cert.not_valid_before_utc.isoformat()}",
        )
    if now > cert.not_valid_after_utc:
        raise _Refused(
            Result.EXPIRED_CERTIFICATE,
            f"{_subject(cert)} expired {cert.not_valid_after_utc.isoformat()}",
        )


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()[:120]


def verify(
    signed: Signed, digest: bytes | None, anchors: Anchors, now: float | None = None
) -> Check:
    """Verify ``signed`` over the image whose ``hash_name`` digest is ``digest``.

    ``digest`` may be None for an unsigned image (nothing to verify). Never raises: anything
    unexpected is an ``error`` result. Blocking (reads the certificate file).
    """
    at = datetime.datetime.now(datetime.UTC) if now is None else (
        datetime.datetime.fromtimestamp(now, datetime.UTC)
    )  # fmt: skip
    fingerprint = signed.fingerprint()

    def check(result: Result, reason: str = "", until: int | None = None) -> Check:
        return Check(result, reason, fingerprint, anchors.fingerprint, until)

    if signed.unsigned:
        return check(Result.UNSIGNED)
    try:
        until = _verify(signed, digest, anchors, at)
    except _Refused as refused:
        return check(refused.result, refused.reason)
    except Exception as exc:  # a check of ours or the library failed: never a crashed fill
        return check(Result.ERROR, f"{type(exc).__name__}: {exc}"[:200])
    return check(Result.VERIFIED, until=until)


def _verify(signed: Signed, digest: bytes | None, anchors: Anchors, now: datetime.datetime) -> int:
    missing = [name for name, v in zip(PROPERTIES, signed.values, strict=True) if v is None]
    if missing:
        raise _Refused(Result.ERROR, f"incomplete signature properties: no {', '.join(missing)}")
    if not all(isinstance(v, str) for v in signed.values):
        raise _Refused(Result.ERROR, "signature properties must be strings")
    method = HASH_METHODS.get(str(signed.hash_method))
    if method is None:
        raise _Refused(Result.ERROR, f"unknown hash method {str(signed.hash_method)[:32]!r}")
    key_type = str(signed.key_type)
    if key_type not in KEY_TYPES:
        raise _Refused(Result.UNKNOWN_KEY_TYPE, f"key type {key_type[:32]!r} is not verified here")
    text = str(signed.signature)
    if len(text) > MAX_SIGNATURE:
        raise _Refused(Result.BAD_SIGNATURE, "img_signature is too long")
    try:
        signature = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _Refused(Result.BAD_SIGNATURE, "img_signature is not base64") from None
    algorithm = method[1]()
    if digest is None or len(digest) != algorithm.digest_size:
        raise _Refused(Result.ERROR, "no digest of the image data to verify")
    cert, until = anchors.certificate(str(signed.certificate), now)
    key = cert.public_key()
    prehashed = utils.Prehashed(algorithm)
    try:
        if key_type == "RSA-PSS":
            if not isinstance(key, rsa.RSAPublicKey):
                raise _wrong_key(key_type)
            pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.MAX_LENGTH)
            key.verify(signature, digest, pss, prehashed)
        elif key_type == "DSA":
            if not isinstance(key, dsa.DSAPublicKey):
                raise _wrong_key(key_type)
            key.verify(signature, digest, prehashed)
        else:
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise _wrong_key(key_type)
            key.verify(signature, digest, ec.ECDSA(prehashed))
    except InvalidSignature:
        raise _Refused(Result.BAD_SIGNATURE, "the signature does not verify") from None
    return until


def _wrong_key(key_type: str) -> _Refused:
    return _Refused(Result.BAD_SIGNATURE, f"the certificate's key is not a {key_type} key")


# --- the user.cached.signature xattr ------------------------------------------------------
NAME = "user.cached.signature"
MAX_LEN = 256
VERSION = 1
_KEYS = frozenset(["v", "result", "fp", "anchors", "until"])
_FP = re.compile(r"[0-9a-f]{16}")
_ANCHORS = re.compile(r"[0-9a-f]{8}")
_MAX_TIME = 1 << 40


def dumps(check: Check) -> bytes:
    """Encode ``check`` (its reason is logged, not stored) in at most 256 bytes."""
    raw = codec.dumps(
        {
            "v": VERSION,
            "result": check.result.value,
            "fp": check.fingerprint,
            "anchors": check.anchors,
            "until": check.until,
        }
    )
    loads(raw)  # never write what we would refuse to read back
    return raw


def loads(raw: bytes) -> Check:
    """Decode a ``user.cached.signature`` value.

    Raises:
        ValueError: not exactly what :func:`dumps` writes (the caller verifies again).
    """
    doc = codec.loads_object(raw, max_len=MAX_LEN, max_depth=1)
    if doc.keys() != _KEYS:
        raise ValueError(f"keys {sorted(doc.keys())[:8]} are not {sorted(_KEYS)}")
    codec.int_field(doc, "v", low=VERSION, high=VERSION)
    try:
        result = Result(doc["result"])
    except ValueError:
        raise ValueError(f"result: {str(doc['result'])[:40]!r} is not a result") from None
    for key, pattern in (("fp", _FP), ("anchors", _ANCHORS)):
        if not isinstance(doc[key], str) or not pattern.fullmatch(doc[key]):
            raise ValueError(f"{key}: malformed")
    until = None if doc["until"] is None else codec.int_field(doc, "until", low=0, high=_MAX_TIME)
    if (until is None) != (result is not Result.VERIFIED):
        raise ValueError("until: only a verified result has one")
    return Check(result, "", doc["fp"], doc["anchors"], until)


__all__ = [
    "HASH_METHODS",
    "KEY_TYPES",
    "MEANINGS",
    "NAME",
    "PROPERTIES",
    "Anchors",
    "Check",
    "Result",
    "SignatureCheck",
    "Signed",
    "dumps",
    "loads",
    "verify",
]
