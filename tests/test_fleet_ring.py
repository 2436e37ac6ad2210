"""Rendezvous hashing (cached/fleet/ring.py, issue 17): load balance, minimal movement when
the fleet changes, and the same order in separate processes. Fixed seeds throughout."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import uuid
from collections import Counter

import pytest

from cached.fleet import ring

IDS = 100_000


def image_ids(seed: int, count: int = IDS) -> list[str]:
    rng = random.Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(count)]


def members(n: int) -> list[str]:
    return [f"ctl-{i}" for i in range(1, n + 1)]


def owners(fleet: list[str], ids: list[str]) -> list[str]:
    return [ring.owner(fleet, i) for i in ids]


def test_score_is_the_first_eight_bytes_of_sha256_of_member_nul_image() -> None:
    expected = hashlib.sha256(b"ctl-2\0" + b"abc").digest()[:8]
    assert ring.score("ctl-2", "abc") == int.from_bytes(expected, "big")
    fleet = members(5)
    ranked = ring.order(fleet, "abc")
    assert sorted(ranked) == sorted(fleet)
    scores = [ring.score(m, "abc") for m in ranked]
    assert scores == sorted(scores, reverse=True)
    assert ring.owner(fleet, "abc") == ranked[0]


@pytest.mark.parametrize("n", [3, 5, 7])
def test_the_busiest_owner_is_within_five_percent_of_the_mean(n: int) -> None:
    counts = Counter(owners(members(n), image_ids(seed=n)))
    mean = IDS / n
    assert set(counts) == set(members(n))
    busiest = max(counts.values())
    print(f"N={n}: busiest owner {busiest} = {busiest / mean - 1:+.2%} over the mean")
    assert busiest <= 1.05 * mean


@pytest.mark.parametrize("n", [3, 5])
def test_a_member_that_joins_or_leaves_moves_only_its_own_ids(n: int) -> None:
    ids = image_ids(seed=100 + n)
    before = owners(members(n), ids)
    grown = members(n + 1)
    newcomer = grown[-1]
    after = owners(grown, ids)
    moved = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert all(after[i] == newcomer for i in moved)  # only to the newcomer
    share = len(moved) / IDS
    print(f"N={n}->{n + 1}: {share:.4f} of ids moved (1/(N+1) = {1 / (n + 1):.4f})")
    assert abs(share - 1 / (n + 1)) <= 0.01
    # ... and when it leaves again, exactly its ids go back, nobody else's move.
    assert owners(members(n), ids) == before
    # A member other than the last leaves: only the ids it owned move.
    gone = members(n)[0]
    rest = [m for m in members(n) if m != gone]
    shrunk = owners(rest, ids)
    for was, now in zip(before, shrunk, strict=True):
        assert was == now or was == gone
    share_gone = sum(1 for was in before if was == gone) / IDS
    assert abs(share_gone - 1 / n) <= 0.01
    # The fallback order of the others is kept: the new owner of a moved id was second.
    for i in range(0, IDS, 997):
        if before[i] == gone:
            assert shrunk[i] == ring.order(members(n), ids[i])[1]


_CHILD = """
import json, sys
from cached.fleet import ring
ids, fleet = json.load(sys.stdin)
print(json.dumps([ring.order(fleet, i) for i in ids]))
"""


def test_the_same_order_in_a_separate_process() -> None:
    ids = image_ids(seed=7, count=2000)
    fleet = members(7)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=json.dumps([ids, fleet]),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "PYTHONHASHSEED": "12345"},  # a different str hash seed
    )
    assert json.loads(done.stdout) == [ring.order(fleet, i) for i in ids]
