"""Seed derivation: one stable 63-bit seed per (purpose, run seed, key).

Noise per layer, synthetic-data shards and LoRA data order all derive their
seeds here, from a hash, so a derived seed does not depend on visiting order,
worker count, Python version or which other keys exist.
"""

from __future__ import annotations

import hashlib

__all__ = ["derive_seed"]

_MASK = (1 << 63) - 1


def derive_seed(purpose: str, seed: int, key: str | int) -> int:
    """``sha256("<purpose>:<seed>:<key>")``'s first 8 bytes (little endian), 63 bits.

    ``purpose`` keeps streams apart ("afm-noise", "afm-shard", "afm-lora").
    """
    digest = hashlib.sha256(f"{purpose}:{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & _MASK
