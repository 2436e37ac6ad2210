"""The fleet: peer fill between the caches of one control plane (issue 17).

A miss is filled from a sibling that holds a verified copy, so an image leaves the backend
once per fleet while every member keeps its own verified copy. The parts:

- ``ring``: who owns an image and the order siblings are asked in (rendezvous hashing);
  pure functions.
- ``trust``: the signature every peer request carries (HMAC-SHA256, the fleet key).
- ``serve``: the ``/cached-peer/v1/`` routes a member answers its siblings on.
- ``peers``: the client side: :class:`peers.PeerSource` (a sibling as a byte source of a
  fill, cached/fill/sources.py) and :class:`peers.FleetSources` (which source a transfer
  takes), with the siblings' health.
- ``notices``: what every sibling is told when an image changes through this member (an
  image deleted: drop the copy; anything else: forget the allowances), retried.
- ``state``: this member's view of the fleet (``GET /cached-peer/v1/state``,
  ``GET /v2/cache/fleet``).

This layer sits above ``download`` (it serves copies with the reader) and below ``jobs``;
the composition root (cached/app.py) builds it only when ``fleet_members`` lists two
members or more.
"""
