"""Seeds derived from (seed, ...): every random draw of a run is a pure function of where it happens."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *where: object) -> int:
    """A 63-bit seed for `seed` at a place such as ("step", 12) or ("image", 7), well mixed."""
    digest = hashlib.sha256("/".join(map(str, (seed, *where))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
