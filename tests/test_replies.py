"""cached's own error pages (issue 19 item 12): the shapes Glance 33 gives for each Accept.

The expected bodies are a real Glance 33's, copied from its answers to a refused
``GET /v2/images/{id}/file`` (tests/test_real_glance.py compares them live).
"""

from __future__ import annotations

import json

import pytest

from cached.upstream import pages

MESSAGE = "No image found with ID 2eebef88-82c6-4c58-b360-4bc8b801c3cd"


@pytest.mark.parametrize(
    ("accept", "kind"),
    [
        (None, "text/plain"),
        ("", "text/plain"),
        ("text/plain", "text/plain"),
        ("application/json", "application/json"),
        ("application/json, text/plain", "application/json"),
        ("text/plain;q=0.5, application/json", "application/json"),
        ("application/json;q=0.2, text/plain", "application/json"),
        ("*/*", "text/html"),
        ("text/html", "text/html"),
        ("application/*", "application/json"),
        ("application/json;q=0, */*", "text/html"),
        ("image/png", "text/plain"),
        ("application/vnd.openstack.images-v2", "text/plain"),
    ],
)
def test_webobs_choice_of_shape(accept: str | None, kind: str) -> None:
    assert pages.negotiate(accept) == kind


def test_the_three_shapes_are_glances() -> None:
    plain = pages.render(404, MESSAGE, None)
    assert plain.content_type == "text/plain; charset=UTF-8"
    assert plain.body == f"404 Not Found\n\n{MESSAGE}\n\n   ".encode()

    as_json = pages.render(404, MESSAGE, "application/json")
    assert as_json.content_type == "application/json"
    # byte for byte as Glance's (key order and separators included)
    assert as_json.body == (
        b'{"message": "' + MESSAGE.encode() + b'<br /><br />\\n\\n\\n", '
        b'"code": "404 Not Found", "title": "Not Found"}'
    )
    assert json.loads(as_json.body)["title"] == "Not Found"

    page = pages.render(404, MESSAGE, "*/*")
    assert page.content_type == "text/html; charset=UTF-8"
    assert page.body == (
        b"<html>\n <head>\n  <title>404 Not Found</title>\n </head>\n <body>\n"
        b"  <h1>404 Not Found</h1>\n  " + MESSAGE.encode() + b"<br /><br />\n\n\n\n"
        b" </body>\n</html>"
    )


def test_an_html_page_escapes_what_the_caller_sent() -> None:
    page = pages.render(404, "No image found with ID <script>", "text/html")
    assert b"<script>" not in page.body and b"&lt;script&gt;" in page.body


def test_a_416_page_has_webobs_title_and_glances_detail() -> None:
    """As a real Glance 33 answered ``Range: bytes=1000-`` for a 1000-byte image."""
    detail = (
        "Invalid start position in Range header. Start position MUST be in the inclusive "
        "range [0, 999]."
    )
    explanation = "The Range requested is not available."
    plain = pages.render(416, explanation, None, detail)
    assert plain.body == (
        f"416 Request Range Not Satisfiable\n\n{explanation}\n\n {detail}  ".encode()
    )
    as_json = json.loads(pages.render(416, explanation, "application/json", detail).body)
    assert as_json == {
        "message": f"{explanation}<br /><br />\n{detail}\n\n",
        "code": "416 Request Range Not Satisfiable",
        "title": "Request Range Not Satisfiable",
    }
    page = pages.render(416, explanation, "*/*", "Invalid Range header.")
    assert page.body.endswith(
        b"  The Range requested is not available.<br /><br />\nInvalid Range header.\n\n\n"
        b" </body>\n</html>"
    )
