"""Seeds derived from (seed, ...): every random draw of a run is a pure function of where it happens."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *where: object) -> int:
    """A 63-bit seed for `seed` at a place such as ("step", 12) or ("image", 7), well mixed."""
    digest = hashlib.sha256("/".join(map(str, (seed, *where))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def image_seeds(seed: int, stop: int, start: int = 0) -> list[int]:
    """The seeds of images start..stop-1 of a sampling call: image i's noise does not depend on its batch,
    its chunk or its rank."""
    return [derive_seed(seed, "image", i) for i in range(start, stop)]
