"""Image signatures against a real Glance 33 (the ``glance`` tier; issue 18): an image
uploaded through cached and cached unsigned, then its signature properties set by ``PATCH``
through cached (as an operator signs an image after upload; Glance itself would need
Barbican to verify them at upload). The next hit verifies them from the cached file; a
signature replaced by a wrong one is a ``bad-signature``.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from realglance import CachedDaemon, FailureLogs, GlanceCLI, GlanceServer, http, image_json
from test_real_glance import (  # noqa: F401  (fixtures)
    cli,
    failure_logs,
    glance_venv,
    keystone,
    real_glance,
    wait_for,
)
from test_safety_signature import DATA, PKI, check, pki  # noqa: F401  (a fixture)

from cached.safety import signature as sig
from cached.safety.signature import Result

pytestmark = [pytest.mark.glance, pytest.mark.timeout(300)]

MiB = 1 << 20
PATCH = {"Content-Type": "application/openstack-images-v2.1-json-patch"}


@pytest.fixture(scope="module")
def signing_cached(
    real_glance: GlanceServer,  # noqa: F811
    pki: PKI,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
    failure_logs: FailureLogs,  # noqa: F811
) -> Iterator[CachedDaemon]:
    workdir = tmp_path_factory.mktemp("cached-signing")
    conf = workdir / "cached.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "image_signature_verify": True,
                "image_signature_certificate_dir": str(pki.certs),
                "image_signature_ca_file": str(pki.ca_file),
            }
        )
    )
    daemon = CachedDaemon(workdir, real_glance.url, workdir / "cache", ["-c", str(conf)])
    failure_logs.add({"cached (signatures)": daemon.log})
    daemon.start()
    yield daemon
    daemon.stop()


def test_signature_set_by_patch_after_upload(
    real_glance: GlanceServer,  # noqa: F811
    signing_cached: CachedDaemon,
    cli: GlanceCLI,  # noqa: F811
    pki: PKI,  # noqa: F811
    tmp_path: Path,
) -> None:
    cached = signing_cached
    src = tmp_path / "signed.img"
    data = os.urandom(2 * MiB + 99)
    src.write_bytes(data)
    image_id = cli.create_image(cached.url, "token-p1", src, "signed-later")
    file_url = f"{cached.url}/v2/images/{image_id}/file"

    def hit() -> str:
        status, headers, body = http("GET", file_url, "token-p1")
        assert (status, body == data) == (200, True)
        assert headers.get("cache-status", "").startswith("cached; hit"), headers
        return headers.get("cached-image-signature", "")

    status, _, body = http("GET", file_url, "token-p1")  # the miss that caches it
    assert (status, body == data) == (200, True)
    assert wait_for(lambda: (cached.cache_dir / image_id).exists())
    assert hit() == "unsigned"

    props = pki.properties("rsa", data, "SHA-512")  # Glance's os_hash_algo: sha512
    ops = [{"op": "add", "path": f"/{k}", "value": v} for k, v in props.items()]
    status, _, text = http(
        "PATCH", f"{cached.url}/v2/images/{image_id}", "token-p1", PATCH, json.dumps(ops).encode()
    )
    assert status == 200, text
    record = image_json(real_glance.url, "token-p1", image_id)
    assert {k: record.get(k) for k in props} == props
    assert hit() == "verified"
    found = sig.loads(os.getxattr(cached.cache_dir / image_id, sig.NAME))
    assert found.result is sig.Result.VERIFIED

    wrong = pki.sign("rsa", b"another image", "SHA-512")
    ops = [{"op": "replace", "path": f"/{sig.SIGNATURE}", "value": wrong}]
    status, _, text = http(
        "PATCH", f"{cached.url}/v2/images/{image_id}", "token-p1", PATCH, json.dumps(ops).encode()
    )
    assert status == 200, text
    assert hit() == "bad-signature"
    assert "signature bad-signature" in cached.output()


# cursive itself (Nova's and Glance's verifier) runs in the Glance tier's virtualenv, where
# Glance 33 brings it: not a dependency of cached's (it brings castellan).
CURSIVE = """
import json, sys
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cursive import signature_utils as u
props = json.load(open(sys.argv[1]))
cert = x509.load_pem_x509_certificate(open(sys.argv[2], "rb").read())
out = {"types": sorted(u.SignatureKeyType.REGISTERED_TYPES), "verified": []}
for name in sys.argv[3:]:
    verifier = u.SignatureKeyType.lookup(props["img_signature_key_type"]).create_verifier(
        u.get_signature(props["img_signature"]),
        u.get_hash_method(props["img_signature_hash_method"]),
        cert.public_key(),
    )
    data = open(name, "rb").read()
    verifier.update(data[:1000])
    verifier.update(data[1000:])
    try:
        verifier.verify()
        out["verified"].append(True)
    except InvalidSignature:
        out["verified"].append(False)
print(json.dumps(out))
"""


@pytest.mark.parametrize("signer", ["rsa", "p384", "p521", "dsa"])
@pytest.mark.parametrize("method", ["SHA-256", "SHA-512"])
def test_cursive_agrees(
    glance_venv: Path,  # noqa: F811
    pki: PKI,  # noqa: F811
    signer: str,
    method: str,
    tmp_path: Path,
) -> None:
    """Cross-check with cursive 0.3.1: the same signatures verify, the same tampered data
    does not, and the key types are the same."""
    props = pki.properties(signer, DATA, method)
    (tmp_path / "props.json").write_text(json.dumps(props))
    (tmp_path / "good").write_bytes(DATA)
    (tmp_path / "bad").write_bytes(DATA + b"x")
    cert = pki.certs / f"{props[sig.CERTIFICATE]}.pem"
    result = subprocess.run(
        [str(glance_venv / "bin" / "python"), "-c", CURSIVE, str(tmp_path / "props.json"),
         str(cert), str(tmp_path / "good"), str(tmp_path / "bad")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    theirs = json.loads(result.stdout)
    assert theirs["types"] == sorted(sig.KEY_TYPES)
    ours = [check(pki, props, data).result is Result.VERIFIED for data in (DATA, DATA + b"x")]
    assert theirs["verified"] == ours == [True, False]
