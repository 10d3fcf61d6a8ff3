"""Prefix-cache hashes: a full block's identity is its whole prefix, not just its own tokens.

A block's hash is sha256(msgpack((parent hash, its token ids, extra keys))), chaining the
hash of the block before it, so two blocks hash equal only if every token up to their end is
equal. The extra keys hold what else changes the K/V for the same tokens: the model name
today, an adapter (LoRA) name once there are adapters.

Why sha256 rather than Python's `hash()`: the hashes must mean the same in every process and
after a restart (`hash()` of a str is salted per process unless PYTHONHASHSEED is fixed), and
a collision would silently serve one prompt's K/V to another (vLLM's CVE-2025-25183 came from
a predictable `hash()`). A block is hashed once, for far less than computing its K/V costs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgspec

_encoder = msgspec.msgpack.Encoder()

ExtraKeys = tuple[str | None, ...]


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra_keys: ExtraKeys) -> bytes:
    """The hash of one full block whose predecessor hashed to `parent` (None for the first)."""
    return hashlib.sha256(_encoder.encode((parent, list(token_ids), extra_keys))).digest()


def extend_block_hashes(
    hashes: list[bytes], token_ids: Sequence[int], block_size: int, extra_keys: ExtraKeys
) -> None:
    """Append to `hashes` the hash of every full block of `token_ids` not hashed yet."""
    parent = hashes[-1] if hashes else None
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], extra_keys)
        hashes.append(parent)
