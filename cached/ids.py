"""Image ids: what Glance accepts as one. A leaf: it imports nothing from ``cached``.

Pure functions, no shared state.
"""

from __future__ import annotations

import uuid


def is_image_id(value: str) -> bool:
    """Whether ``value`` is a canonical UUID (what Glance accepts as an image id)."""
    try:
        return str(uuid.UUID(value)) == value.lower() and len(value) == 36
    except (ValueError, AttributeError, TypeError):
        return False
