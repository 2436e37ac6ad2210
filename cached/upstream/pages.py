"""Glance's error pages, as webob writes them: the one place their three shapes are made.

Glance 33 answers an error in the shape the client's ``Accept`` asks for (webob's
``best_match`` over ``text/html``, ``application/json``, ``text/plain``; ``text/plain``
without an ``Accept``). Seen from a real Glance 33 for a refused ``GET /v2/images/{id}/file``:

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
from dataclasses import dataclass
from http import HTTPStatus

# webob's offers, in the order it tries them (the first wins a tie).
_OFFERS = ("text/html", "application/json", "text/plain")
# webob's titles where they differ from Python's reason phrases.
_TITLES = {416: "Request Range Not Satisfiable"}


@dataclass(frozen=True)
class Page:
    """An error page: its body and its ``Content-Type``."""

    body: bytes
    content_type: str


def negotiate(accept: str | None) -> str:
    """The media type webob picks for an error page given ``accept`` (RFC 9110 §12.5.1):
    the offer with the highest quality, the more specific range deciding a tie, then the
    order of :data:`_OFFERS`; ``text/plain`` without an ``Accept`` or with no match."""
    if not accept or not accept.strip():
        return "text/plain"
    ranges: list[tuple[str, float]] = []
    for part in accept.split(","):
        media, _, params = part.strip().partition(";")
        media = media.strip().lower()
        if not media:
            continue
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        ranges.append((media, q))
    best, best_key = "text/plain", (0.0, -1)
    for offer in _OFFERS:
        kind = offer.split("/", 1)[0]
        match: tuple[float, int] | None = None
        for media, q in ranges:
            specificity = (
                2 if media == offer else 1 if media == f"{kind}/*" else 0 if media == "*/*" else -1
            )
            if specificity >= 0 and (match is None or specificity > match[1]):
                match = (q, specificity)
        if match is not None and match[0] > 0 and match > best_key:
            best, best_key = offer, match
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
        text, more = html.escape(message, quote=False), html.escape(detail, quote=False)
        page = (
            f"<html>\n <head>\n  <title>{code}</title>\n </head>\n <body>\n  <h1>{code}</h1>\n"
            f"  {text}<br /><br />\n{more}\n\n\n </body>\n</html>"
        )
        return Page(page.encode(), "text/html; charset=UTF-8")
    return Page(f"{code}\n\n{message}\n\n {detail}  ".encode(), "text/plain; charset=UTF-8")
