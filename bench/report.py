"""Result tables: one per scenario, each with cached's row, baselines with cached/baseline
ratios, and the issue's targets printed as goals (never asserted)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Value = float | int | str | None


@dataclass
class Column:
    key: str
    title: str
    fmt: str = "{:.0f}"
    ratio: bool = True  # show cached ÷ baseline for this column


@dataclass
class Goal:
    text: str
    actual: str
    met: bool | None  # None: could not be judged (missing data)

    def render(self) -> str:
        mark = {True: "met", False: "MISSED", None: "n/a"}[self.met]
        return f"goal: {self.text} -> {self.actual} [{mark}]"


@dataclass
class Table:
    key: str
    title: str
    columns: list[Column]
    cached_row: str = "cached"
    rows: list[tuple[str, dict[str, Value]]] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def add(self, system: str, **values: Value) -> None:
        self.rows.append((system, values))

    def row(self, system: str) -> dict[str, Value]:
        for name, values in self.rows:
            if name == system:
                return values
        return {}

    def value(self, system: str, key: str) -> float | None:
        v = self.row(system).get(key)
        return float(v) if isinstance(v, int | float) else None

    def goal(self, text: str, actual: float | None, ok: bool | None, fmt: str = "{:.2f}") -> None:
        shown = "no data" if actual is None else fmt.format(actual)
        self.goals.append(Goal(text, shown, None if actual is None else ok))

    # --- rendering ---------------------------------------------------------------------------

    def _cell(self, system: str, col: Column, values: dict[str, Value]) -> str:
        v = values.get(col.key)
        if v is None:
            return "–"
        if isinstance(v, str):
            return v
        text = col.fmt.format(v)
        mine = self.value(self.cached_row, col.key)
        if col.ratio and system != self.cached_row and mine is not None and v:
            text += f" ({mine / v:.2f})"
        return text

    def markdown(self) -> str:
        header = ["system", *(c.title for c in self.columns)]
        body = [[n, *(self._cell(n, c, vals) for c in self.columns)] for n, vals in self.rows]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            pairs = zip(cells[1:], widths[1:], strict=True)
            out = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in pairs]
            return "| " + " | ".join(out) + " |"

        rule = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]])
        lines = [f"### {self.title}", "", line(header), rule + "|", *(line(r) for r in body)]
        if self.goals or self.notes:
            lines.append("")
        lines += [f"- {g.render()}" for g in self.goals]
        lines += [f"- note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "columns": [c.__dict__ for c in self.columns],
            "rows": [{"system": n, **v} for n, v in self.rows],
            "goals": [g.__dict__ for g in self.goals],
            "notes": self.notes,
            "raw": self.raw,
        }


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing (or b is 0)."""
    return None if a is None or not b else a / b


def diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def at_least(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and a >= b


def at_most(a: float | None, b: float | None, k: float = 1.0) -> bool:
    """a <= k * b (False when either is missing)."""
    return a is not None and b is not None and a <= k * b


LEGEND = (
    "Medians over the rounds. `(x)` after a baseline value = cached ÷ that value "
    "(above 1 means cached has more of it: good for MB/s and req/s, bad for times, CPU, RSS)."
)


def render(tables: list[Table], problems: list[str], header: str) -> str:
    parts = [header, "", LEGEND, ""]
    parts += [t.markdown() + "\n" for t in tables]
    if problems:
        parts.append("### Problems seen in this run\n")
        parts += [f"- {p}" for p in problems]
    return "\n".join(parts)


README_HEADING = "## Latest full run on the 2-core machine"


def update_readme(readme: Path, text: str) -> None:
    """Replace everything after README_HEADING in ``readme`` with ``text``."""
    doc = readme.read_text()
    head, sep, _ = doc.partition(README_HEADING)
    if not sep:
        raise ValueError(f"{readme} has no '{README_HEADING}' section")
    readme.write_text(f"{head}{README_HEADING}\n\n{text.strip()}\n")


def write_json(path: Path, meta: dict[str, Any], tables: list[Table], problems: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**meta, "tables": [t.to_json() for t in tables], "problems": problems}
    path.write_text(json.dumps(doc, indent=1, default=str))
