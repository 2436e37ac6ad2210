"""A member's view of the fleet: what ``GET /cached-peer/v1/state`` answers a sibling and
``GET /v2/cache/fleet`` an operator (cached/manage/api.py; ``cached-manage fleet-status``).

One JSON object, read from the loop's state at the moment asked (nothing is probed)::

    {"id": "ctl-2", "list": "<digest of fleet_members>", "members": ["ctl-1", "ctl-2", ...],
     "cache": "ok",                                    # the cache directory's state
     "counts": {"complete": 12, "partial": 1, "bytes": 123, "fills": 1,
                "peer_streams": 0, "suspects": 0},
     "siblings": {"ctl-1": {"url": "https://...", "up": true, "down_for": 0.0,
                  "backoff": 0.0, "last_error": null, "last_error_at": null,
                  "bytes_received": 0, "bytes_sent": 0,
                  "notices_pending": {"delete": 1}}}}

``up`` is this member's opinion (cached/fleet/peers.py ``PeerHealth``: a sibling that failed
a request is down for 1 s doubling to 30 s); ``bytes_*`` are image bytes since this member
started; ``notices_pending``: deletes and forgets not yet taken (cached/fleet/notices.py).

Threads: the event loop (it reads loop-owned state).
"""

from __future__ import annotations

from typing import Any

from cached.cachedir.directories import Directories
from cached.fill.registry import Filler
from cached.fleet.notices import Notices
from cached.fleet.peers import Fleet
from cached.fleet.serve import PeerService
from cached.store import Store


def member_view(
    fleet: Fleet,
    notices: Notices,
    service: PeerService,
    store: Store,
    filler: Filler,
    directories: Directories,
) -> dict[str, Any]:
    """This member's view of the fleet (see the module's docstring)."""
    complete = partial = size = 0
    for entry in store.entries.values():
        if entry.complete:
            complete += 1
            size += entry.size
        else:
            partial += 1
    pending = notices.pending()
    siblings = {
        member_id: {
            "url": member.url,
            **fleet.health.view(member_id),
            "bytes_received": fleet.bytes_from.get(member_id, 0),
            "bytes_sent": service.bytes_to.get(member_id, 0),
            "notices_pending": pending.get(member_id, {}),
        }
        for member_id, member in sorted(fleet.siblings.items())
    }
    return {
        "id": fleet.trust.self_id,
        "list": fleet.trust.digest,
        "members": [m.id for m in fleet.trust.members],
        "cache": directories.cache.state.value,
        "counts": {
            "complete": complete,
            "partial": partial,
            "bytes": size,
            "fills": len(filler.fills),
            "peer_streams": service.streams,
            "suspects": fleet.suspects(),
        },
        "siblings": siblings,
    }
