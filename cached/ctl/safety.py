"""``cached-manage safety …``: the content verdicts of the daemons' caches (issue 18), over
the management API's safety endpoints (``/v2/cache/safety``; cached/manage/api.py).

- ``safety list``: every cached image's verdict (one table for every host with
  ``--all-hosts``), then, under enforce, the images kept out of the cache (their verdict, or
  ``signature_violation``: the signature result that keeps them out);
- ``safety show ID``: one image's verdict and override;
- ``safety recheck ID``: inspect it again from its file now;
- ``safety audit [--every]``: start an audit pass (``--every``: current verdicts too);
- ``safety override ID --hash H [--reason TEXT]`` / ``safety override ID --remove``: let the
  image with that ``os_hash_value`` be served whatever its verdict (what ``enforce`` honours),
  or withdraw that.

``--json`` prints ``{"verdicts"|"audits": [...], "errors": [...]}`` like the other commands
(``list`` adds ``"violations": [...]``, the API's rows with their host).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cached.ctl import render
from cached.ctl.client import Client, Forbidden, HostError, gather_json

OK, FAILED = 0, 1
_HASH = re.compile(r"[0-9a-fA-F]{32,128}")


@dataclass(frozen=True)
class Action:
    name: str
    help: str
    failure: str  # "Failed to <failure>. Got error:"
    takes_id: bool = False


ACTIONS = {
    a.name: a
    for a in (
        Action("list", "List the content verdicts of the cached images", "list verdicts"),
        Action("show", "Show one image's verdict", "show the verdict", True),
        Action("recheck", "Inspect one image again from its file now", "recheck the image", True),
        Action("audit", "Start an audit pass (--every: current verdicts too)", "start an audit"),
        Action(
            "override",
            "Let the image with --hash H be served whatever its verdict (--remove: withdraw)",
            "override the verdict",
            True,
        ),
    )
}

HELP = "safety list|show ID|recheck ID|audit|override ID --hash H"


def add_options(p: argparse.ArgumentParser) -> None:
    """The options only ``safety`` takes."""
    p.add_argument("--hash", metavar="H", help="safety override: the image's os_hash_value")
    p.add_argument("--reason", default="", metavar="TEXT", help="safety override: why (logged)")
    p.add_argument("--remove", action="store_true", help="safety override: withdraw it")
    p.add_argument("--every", action="store_true", help="safety audit: current verdicts too")


def check_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Action:
    """The action of ``safety ACTION [ID]`` (positionals ``image_id`` and ``extra``); exits
    with 2 on a usage error. Leaves the image ID in ``args.image_id``."""
    name, image_id = args.image_id, args.extra
    if name not in ACTIONS:
        parser.error(f"safety: give one of {', '.join(ACTIONS)} (got {name!r})")
    action = ACTIONS[name]
    if action.takes_id:
        if image_id is None:
            parser.error(f"please specify the ID of the image for command 'safety {name}'")
        try:
            uuid.UUID(image_id)
        except ValueError:
            parser.error(f"Image ID '{image_id}' is not a valid UUID.")
    elif image_id is not None:
        parser.error(f"command 'safety {name}' takes no image ID (got {image_id!r})")
    if name == "override" and not args.remove:
        if args.hash is None or not _HASH.fullmatch(args.hash):
            parser.error("safety override: give --hash with the image's os_hash_value (hex)")
    args.image_id, args.extra_action = image_id, name
    return action


def _request(action: Action, args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    base = "/v2/cache/safety"
    if action.name == "list":
        return "GET", base, None
    if action.name == "audit":
        return "POST", f"{base}/audit" + ("?every=true" if args.every else ""), None
    path = f"{base}/{args.image_id}"
    if action.name == "show":
        return "GET", path, None
    if action.name == "recheck":
        return "POST", f"{path}/recheck", None
    if args.remove:
        return "DELETE", f"{path}/override", None
    return "PUT", f"{path}/override", {"os_hash_value": args.hash.lower(), "reason": args.reason}


async def execute(
    action: Action,
    args: argparse.Namespace,
    clients: list[Client],
    confirm: Callable[[str, bool], bool],
) -> int:
    """Run ``action`` on every host at once and print the answers. An override (made or
    withdrawn) is confirmed first unless ``-f`` (``confirm(question, to_stderr)``, the
    glance-cache-manage prompt)."""
    multi = args.all_hosts or len(clients) > 1
    if action.name == "override" and not args.force:
        what = "Withdraw the safety override of" if args.remove else "Override the verdict of"
        question = f"{what} image {args.image_id}"
        if multi:
            question += f" on {', '.join(c.target.label for c in clients)}"
        if not confirm(question + "?", args.json):
            return OK
    method, path, body = _request(action, args)
    rows: list[dict[str, Any]] = []
    kept_out: list[dict[str, Any]] = []  # list: enforce's violations (images not cached)
    errors: list[HostError] = []
    for client, answer in await gather_json(clients, method, path, body):
        if isinstance(answer, HostError):
            errors.append(answer)
            continue
        host = client.target.label
        if action.name == "list":
            verdicts = answer.get("verdicts") if isinstance(answer, dict) else None
            if not isinstance(verdicts, list):
                errors.append(HostError(client.target, "the answer has no verdicts list"))
                continue
            rows += [{"host": host, **v} for v in verdicts if isinstance(v, dict)]
            found = answer.get("violations")
            if isinstance(found, list):
                kept_out += [{"host": host, **v} for v in found if isinstance(v, dict)]
        elif isinstance(answer, dict):
            rows.append({"host": host, **answer})
        else:  # (DELETE answers nothing)
            rows.append({"host": host, "image_id": args.image_id, "override": None})
    key = "audits" if action.name == "audit" else "verdicts"
    if args.json:
        failed = [{"host": e.target.label, "status": e.status, "error": e.message} for e in errors]
        out: dict[str, Any] = {key: rows}
        if action.name == "list":
            out["violations"] = kept_out
        print(json.dumps({**out, "errors": failed}, indent=2))
    elif action.name == "list":
        _print_list(rows, multi, len(clients) - len(errors), errors, len(clients))
        _print_kept_out(kept_out, multi)
    elif action.name == "audit":
        for row in rows:
            said = "audit started" if row.get("started") else "an audit is already running"
            print(f"{row['host']}: {said}" if multi else said[0].upper() + said[1:])
    else:
        for row in rows:
            _print_one(row, multi)
    return _report(action, errors, multi, args.json)


def _cells(row: dict[str, Any]) -> list[str]:
    override = "applies" if row.get("overridden") else ("other hash" if row.get("override") else "")
    verdict = row.get("verdict") or "none"
    if row.get("verdict") and not row.get("current"):
        verdict += " (stale)"
    return [
        str(row.get("image_id")),
        verdict,
        str(row.get("detected") or "-"),
        str(row.get("declared") or "-"),
        ",".join(row.get("checks") or []) or "-",
        override or "-",
    ]


def _print_list(
    rows: list[dict[str, Any]], multi: bool, answered: int, errors: list[HostError], asked: int
) -> None:
    if not rows:
        if len(errors) < asked:
            print("No cached images.")
        return
    hosts = f" on {answered} host{'s' if answered != 1 else ''}" if multi else ""
    print(f"Found {len(rows)} cached images{hosts}...")
    header = ["ID", "Verdict", "Detected", "Declared", "Checks", "Override"]
    cells = [_cells(row) for row in rows]
    if multi:
        header = ["Host", *header]
        cells = [[row["host"], *c] for row, c in zip(rows, cells, strict=True)]
    print(render.table(header, cells, {h: "l" for h in header}))


def _print_kept_out(rows: list[dict[str, Any]], multi: bool) -> None:
    """enforce's violations: images kept out of the cache, for their content (verdict and
    checks) or their signature (its result)."""
    if not rows:
        return
    print(f"Kept out of the cache (enforce): {len(rows)} image{'s' if len(rows) != 1 else ''}")
    header = ["ID", "Verdict", "Checks", "Signature", "Override"]
    cells = [
        [
            str(row.get("image_id")),
            str(row.get("verdict") or "none"),
            ",".join(row.get("checks") or []) or "-",
            str(row.get("signature_violation") or "-"),
            "applies" if row.get("overridden") else ("other hash" if row.get("override") else "-"),
        ]
        for row in rows
    ]
    if multi:
        header = ["Host", *header]
        cells = [[row["host"], *c] for row, c in zip(rows, cells, strict=True)]
    print(render.table(header, cells, {h: "l" for h in header}))


def _print_one(row: dict[str, Any], multi: bool) -> None:
    prefix = f"{row['host']}: " if multi else ""
    override = row.get("override")
    lines = [f"image {row.get('image_id')}"]
    if row.get("cached") is False:
        lines.append("  not cached here")
    elif "verdict" in row:
        current = (
            ""
            if row.get("current") or not row.get("verdict")
            else " (stale: inspected again on its next hit or audit)"
        )
        lines += [
            f"  verdict:   {row.get('verdict') or 'none'}{current}",
            f"  detected:  {row.get('detected') or '-'}",
            f"  declared:  {row.get('declared') or '-'} / {row.get('container') or '-'}",
            f"  checks:    {','.join(row.get('checks') or []) or '-'}",
            f"  oslo.utils {row.get('oslo_utils') or '-'}, policy {row.get('policy') or '-'}",
        ]
    if isinstance(override, dict):
        applies = "applies" if row.get("overridden") else "does not apply to the cached bytes"
        lines.append(
            f"  override:  os_hash_value {str(override.get('os_hash_value'))[:16]}… "
            f"({applies}; {override.get('reason') or 'no reason given'})"
        )
    elif "override" in row:
        lines.append("  override:  none")
    for line in lines:
        print(prefix + line)


def _report(action: Action, errors: list[HostError], multi: bool, as_json: bool) -> int:
    for exc in errors:
        if as_json:
            continue
        if multi:
            print(f"{exc.target.label}: {exc.message}", file=sys.stderr)
        elif isinstance(exc, Forbidden):
            print(exc.message, file=sys.stderr)
        else:
            print(f"Failed to {action.failure}. Got error:", file=sys.stderr)
            print(f"{exc.target.label}: {exc.message}", file=sys.stderr)
    return FAILED if errors else OK
