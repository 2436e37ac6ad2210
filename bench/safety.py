"""The ``safety`` scenario: what audit-mode content inspection (issue 18) costs a cold miss and
a hit, against the same build with ``image_safety_mode: off``, and enforce mode (refuse) on
the same (safe) images, measured interleaved in the same run.

The daemons run at once in front of the fast origin, each with its own cache dir. Cold misses
use a fresh image id each (the bench's random data: raw content, decided after 256 KiB like
most formats); hits re-read the newest cold id. The audit daemon's newest entry must carry
``user.cached.verdict``, the other's must not (else the run reports a problem). The
inspector's own cost per byte is measured apart, without a daemon, by
``python -m bench.inspect``.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from bench.env import GIB, Env
from bench.report import Column, Table
from bench.scenarios import FOREIGN_LIMIT, Run, System, check, rotate, timed_fetch

OFF, AUDIT = "cached (image_safety_mode: off)", "cached (audit)"
ENFORCE = "cached (enforce, refuse)"
NAME = "user.cached.verdict"
GOAL = 0.05  # CPU s/GiB audit may add to a cold miss (issue 18, "Done when")


def safety(env: Env) -> list[Table]:
    s = env.settings
    data = env.data("img", s.size)
    gib = data.size / GIB
    off = env.cached("fast", name="cached-safety-off", config={"image_safety_mode": "off"})
    audit = env.cached(
        "fast",
        name="cached-safety-audit",
        config={"image_safety_mode": "audit"},
        exclusive=False,
    )
    enforce = env.cached(
        "fast",
        name="cached-safety-enforce",
        config={"image_safety_mode": "enforce", "image_safety_on_violation": "refuse"},
        exclusive=False,
    )
    systems = [
        System(OFF, off.url, [off.pid]),
        System(AUDIT, audit.url, [audit.pid]),
        System(ENFORCE, enforce.url, [enforce.pid]),
    ]
    cold: dict[str, list[Run]] = {}
    warm: dict[str, list[Run]] = {}
    newest: dict[str, str] = {}
    serial = iter(range(1 << 30))
    for r in range(s.rounds):
        for sys in rotate(systems, r):

            def fresh(sys: System = sys) -> str:
                return env.images.alias(data, f"safety-{sys.name}-{next(serial)}")

            run = timed_fetch(env, sys, fresh, "cold")
            check(env, f"cold {sys.name}", run.fetch, 200, data.size)
            newest[sys.name] = run.image_id
            cold.setdefault(sys.name, []).append(run)
    for r in range(s.rounds):
        for sys in rotate(systems, r):
            run = timed_fetch(env, sys, lambda sys=sys: newest[sys.name], "hit")
            check(env, f"hit {sys.name}", run.fetch, 200, data.size)
            if "hit" not in run.fetch.cache_status:
                env.problem(f"hit {sys.name}: cache status {run.fetch.cache_status!r}")
            warm.setdefault(sys.name, []).append(run)
    _check_verdicts(env, audit.entry(newest[AUDIT]), off.entry(newest[OFF]))
    _check_verdicts(env, enforce.entry(newest[ENFORCE]), off.entry(newest[OFF]))
    t = Table(
        "safety",
        f"content inspection (audit, enforce) vs off, {gib:g} GiB, one client, fast origin "
        f"({s.rounds} rounds)",
        [
            Column("miss_mb_s", "miss MB/s"),
            Column("miss_cpu", "miss CPU s/GiB", "{:.3f}"),
            Column("hit_mb_s", "hit MB/s"),
            Column("hit_cpu", "hit CPU s/GiB", "{:.3f}"),
            Column("foreign", "max foreign CPU s", "{:.2f}", ratio=False),
        ],
        cached_row=AUDIT,
    )
    for sys in systems:
        c, w = cold[sys.name], warm[sys.name]
        t.add(
            sys.name,
            miss_mb_s=statistics.median(x.fetch.mb_s for x in c),
            miss_cpu=statistics.median(x.cpu for x in c) / gib,
            hit_mb_s=statistics.median(x.fetch.mb_s for x in w),
            hit_cpu=statistics.median(x.cpu for x in w) / gib,
            foreign=max(x.foreign for x in [*c, *w]),
        )
        t.raw[sys.name] = {"cold": [x.to_json() for x in c], "hit": [x.to_json() for x in w]}
    mine, base = t.value(AUDIT, "miss_cpu"), t.value(OFF, "miss_cpu")
    if mine is not None and base is not None:
        extra = mine - base
        t.notes.append(
            f"goal: audit adds <= {GOAL} CPU s/GiB to a cold miss: {extra:+.3f} "
            f"{'met' if extra <= GOAL else 'MISSED'} (medians; single runs vary by more than "
            "the inspector's own cost, which bench.inspect measures apart)"
        )
    t.notes.append(
        "(x) here is audit ÷ off; foreign CPU: runs retried when > "
        f"{FOREIGN_LIMIT['hit']} s (hit) / {FOREIGN_LIMIT['cold']} s (cold)"
    )
    return [t]


def _check_verdicts(env: Env, audited: Path, plain: Path) -> None:
    """The audit daemon stored a verdict on its newest entry; the off daemon none."""
    if audited.exists() and NAME not in os.listxattr(audited):
        env.problem(f"audit: no {NAME} on {audited}")
    if plain.exists() and NAME in os.listxattr(plain):
        env.problem(f"off: {NAME} on {plain}")
