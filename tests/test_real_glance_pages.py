"""cached's own error pages against webob itself (the ``glance`` tier: webob comes with
Glance 33 in its virtualenv): for each ``Accept``, the content type and body webob gives an
``HTTPForbidden`` are what ``cached/upstream/pages.py`` makes, so a client parses cached's
refusals as it parses Glance's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from test_real_glance import glance_venv  # noqa: F401  (a fixture)

from cached.upstream import pages

pytestmark = [pytest.mark.glance]

ACCEPTS = [
    None, "", "*/*", "application/json", "text/html", "text/plain",
    "application/json, text/html", "text/*", "application/*",
    "application/json;q=0.9, text/html;q=0.5", "text/html;q=0, */*", "garbage;;", "image/png",
    "application/json;q=0", "text/plain, application/json", "*/*;q=0.1, application/json",
    "a/b,,c/d", "application/json;q=x", "text/html;level=1", "TEXT/HTML",
    "application/json, */*;q=0.8", "text/plain;q=0.5, text/html;q=0.5",
    "text/html;level=1;q=0.5, application/json;q=0.1", "application/json;charset=utf-8",
    "*/*;q=0", "text/*;q=0.5, application/json;q=0.5",
    "text/*;q=0.3, text/html;q=0.2, application/json;q=0.25", "*/*;q=0.5, text/plain",
    "application/json;q=0.2, text/plain",
]  # fmt: skip
MESSAGE = 'Image 1 is "x" & y\'s: <unsafe>.'

WEBOB = """
import json, sys
import webob.exc
from webob import Request
out = []
for accept in json.load(open(sys.argv[1])):
    req = Request.blank("/")
    if accept is not None:
        req.headers["Accept"] = accept
    resp = req.get_response(webob.exc.HTTPForbidden(explanation=sys.argv[2]))
    out.append([resp.content_type, resp.body.decode()])
print(json.dumps(out))
"""


def test_error_pages_are_webobs(glance_venv: Path, tmp_path: Path) -> None:  # noqa: F811
    cases = tmp_path / "accepts.json"
    cases.write_text(json.dumps(ACCEPTS))
    result = subprocess.run(
        [str(glance_venv / "bin" / "python"), "-c", WEBOB, str(cases), MESSAGE],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    theirs = json.loads(result.stdout)
    differ = []
    for accept, (kind, body) in zip(ACCEPTS, theirs, strict=True):
        page = pages.render(403, MESSAGE, accept)
        if (page.content_type.split(";")[0], page.body.decode()) != (kind, body):
            differ.append((accept, page.content_type, kind))
    assert differ == []
