"""Prefix-cache block hashes: chained over the whole prefix, keyed by the model, equal in every process."""

import os
import subprocess
import sys

from scheduler_svc.prefix_cache import extend_block_hashes, hash_block

KEYS = ("model", None)


def test_block_hash_chains_the_whole_prefix_and_the_extra_keys():
    first = hash_block(None, [1, 2], KEYS)
    assert first == hash_block(None, [1, 2], KEYS)
    assert first != hash_block(None, [1, 2], ("another-model", None))
    assert first != hash_block(None, [1, 2], ("model", "an-adapter"))
    # Equal tokens after different prefixes are different blocks.
    assert hash_block(first, [3, 4], KEYS) != hash_block(hash_block(None, [9, 9], KEYS), [3, 4], KEYS)
    hashes: list[bytes] = []
    extend_block_hashes(hashes, [1, 2, 3, 4, 5], 2, KEYS)
    assert hashes == [first, hash_block(first, [3, 4], KEYS)]  # the partial block [5] is not hashed


def test_block_hash_is_the_same_in_another_process():
    code = "from scheduler_svc.prefix_cache import hash_block; print(hash_block(None, [1, 2], ('model', None)).hex())"
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == hash_block(None, [1, 2], KEYS).hex()
