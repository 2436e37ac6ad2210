"""Glance's error pages, as webob writes them: the one place their three shapes are made.

Glance 33 answers an error in the shape the client's ``Accept`` asks for (webob's
acceptable offers ``text/html``, ``application/json``; ``text/plain`` when neither is
acceptable or without an ``Accept``; checked against webob itself by
tests/test_real_glance_pages.py). Seen from a real Glance 33 for a refused
``GET /v2/images/{id}/file``:

* no ``Accept``, ``text/plain``: ``text/plain; charset=UTF-8``,
  ``404 Not Found\\n\\n<msg>\\n\\n   ``;
* ``application/json`` (also first in a list): ``application/json``,
  ``{"message": "<msg><br /><br />\\n\\n\\n", "code": "404 Not Found", "title": "Not Found"}``;
* ``*/*``, ``text/html``: ``text/html; charset=UTF-8``, a small HTML page.

Pure functions, no state: called from anywhere.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from http import HTTPStatus

# webob's offers, in the order it tries them (the first wins a tie); text/plain when neither
# is acceptable.
_OFFERS = ("text/html", "application/json")
# webob's titles where they differ from Python's reason phrases.
_TITLES = {416: "Request Range Not Satisfiable"}
_TAG = re.compile(r"<[^>]*>")


@dataclass(frozen=True)
class Page:
    """An error page: its body and its ``Content-Type``."""

    body: bytes
    content_type: str


def negotiate(accept: str | None) -> str:
    """The media type webob picks for an error page given ``accept`` (RFC 9110 §12.5.1):
    an offer's quality is that of the most specific range matching it; the highest quality
    wins, the order of :data:`_OFFERS` deciding a tie; every offer (the first) for a header
    webob finds invalid; ``text/plain`` without an ``Accept`` or with no match."""
    if not accept or not accept.strip():
        return "text/plain"
    ranges: list[tuple[str, float]] = []
    for part in accept.split(","):
        media, _, params = part.strip().partition(";")
        media = media.strip().lower()
        if not media:
            continue  # an empty element ("a/b,,c/d") is allowed
        kind, _, sub = media.partition("/")
        if not kind or not sub:
            return _OFFERS[0]  # an invalid header: webob takes every offer, in order
        q, extension = 1.0, False
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    return _OFFERS[0]
            elif name.strip():
                extension = True  # "text/html;level=1" matches no offer (they have none)
        if not extension:
            ranges.append((media, q))
    best, best_q = "text/plain", 0.0
    for offer in _OFFERS:
        kind = offer.split("/", 1)[0]
        match: tuple[float, int] | None = None
        for media, q in ranges:
            specificity = (
                2 if media == offer else 1 if media == f"{kind}/*" else 0 if media == "*/*" else -1
            )
            if specificity >= 0 and (match is None or specificity > match[1]):
                match = (q, specificity)
        if match is not None and match[0] > best_q:
            best, best_q = offer, match[0]
    return best


def render(status: int, message: str, accept: str | None, detail: str = "") -> Page:
    """Glance's error page for ``status`` with ``message`` (webob's explanation) and
    ``detail`` (its second line, e.g. of a 416), in the shape ``accept`` asks for."""
    title = _TITLES.get(status)
    if title is None:
        try:
            title = HTTPStatus(status).phrase
        except ValueError:
            title = "Error"
    code = f"{status} {title}"
    kind = negotiate(accept)
    if kind == "application/json":
        doc = {"message": f"{message}<br /><br />\n{detail}\n\n", "code": code, "title": title}
        return Page(json.dumps(doc).encode(), "application/json")
    if kind == "text/html":
        text, more = html.escape(message, quote=True), html.escape(detail, quote=True)
        page = (
            f"<html>\n <head>\n  <title>{code}</title>\n </head>\n <body>\n  <h1>{code}</h1>\n"
            f"  {text}<br /><br />\n{more}\n\n\n </body>\n</html>"
        )
        return Page(page.encode(), "text/html; charset=UTF-8")
    # webob's plain text drops anything that looks like a tag.
    plain, more = _TAG.sub("", message), _TAG.sub("", detail)
    return Page(f"{code}\n\n{plain}\n\n {more}  ".encode(), "text/plain; charset=UTF-8")
