"""Find and load the model's tokenizer: a Hugging Face folder or hub id, or a GGUF file.

Converting a GGUF vocabulary to a fast tokenizer takes seconds, so the converted tokenizer is
saved once under the cache directory and loaded from there by every later process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protocol import EngineConfig
from tokenizer_svc.chat_template import read_chat_template

logger = logging.getLogger("pagoda.tokenizer")


class TokenizerLoadError(Exception):
    pass


def cache_dir() -> str:
    return os.environ.get("PAGODA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pagoda")


def file_cache_key(path: str) -> str:
    """The cache's name for what is made from a file: its path, size and mtime, hashed."""
    st = os.stat(path)
    return hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def save_to_cache(folder: str, save: Callable[[str], None]) -> None:
    """Make cache folder `folder` whole: `save` writes into a new folder beside it, renamed into
    place, so a reader never sees half of one; where another process got there first, its copy
    stays."""
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(folder))
    save(tmp)
    try:
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _gguf_tokenizer_folder(path: str) -> str:
    """Where the tokenizer converted from a GGUF file is kept."""
    return os.path.join(cache_dir(), "tokenizers", file_cache_key(path))


def _load_gguf_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    cached = _gguf_tokenizer_folder(path)
    if os.path.isdir(cached):
        return AutoTokenizer.from_pretrained(cached)
    logger.info("converting the tokenizer of %s (once; cached in %s)", path, cached)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    save_to_cache(cached, tok.save_pretrained)
    return tok


def _tokenizer_path(config: EngineConfig) -> Path:
    """Where the tokenizer is: `--tokenizer`, else `--model` at `--revision` (a separate
    --tokenizer is read at its default revision: vLLM's rule). Raises ModelLoadError."""
    from tokenizer_svc.model_source import resolve_model_path

    source, revision = (config.tokenizer, None) if config.tokenizer else (config.model, config.revision)
    return resolve_model_path(source, revision)


def load_tokenizer(config: EngineConfig) -> Any:
    """The tokenizer of `--tokenizer`, else of `--model` (at `--revision`): a folder, a GGUF file
    (its embedded vocabulary) or a hub id in the Hugging Face cache, resolved as the worker does;
    `--chat-template`, if given, replaces the chat template it ships with."""
    from tokenizer_svc.model_source import ModelLoadError

    try:
        path = _tokenizer_path(config)
    except ModelLoadError as e:
        raise TokenizerLoadError(f"cannot find the tokenizer: {e}") from None
    try:
        if path.is_file() and path.suffix == ".gguf":
            tok = _load_gguf_tokenizer(str(path))
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path))
            if len(tok.get_vocab()) < 2:  # transformers builds an empty one from config.json alone
                raise TokenizerLoadError("no tokenizer files (tokenizer.json, vocab.json, tokenizer.model)")
    except Exception as e:  # transformers raises many kinds here; all mean "no usable tokenizer"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = "" if config.tokenizer else "; pass one with --tokenizer"
        raise TokenizerLoadError(f"cannot load a tokenizer from {str(path)!r}: {reason}{hint}") from None
    if config.chat_template:
        tok.chat_template = read_chat_template(config.chat_template)
    return tok


def tokenizer_json(config: EngineConfig) -> str | None:
    """The text of the model's `tokenizer.json` (the fast tokenizer's whole definition), when
    there is one: its folder's, or the one converted from a GGUF file once a tokenizer process
    has done it. The worker reads it for structured outputs without importing transformers'
    tokenizer stack (seconds, in a process that must keep stepping)."""
    from tokenizer_svc.model_source import ModelLoadError

    try:
        path = _tokenizer_path(config)
    except ModelLoadError:
        return None
    folder = _gguf_tokenizer_folder(str(path)) if path.is_file() and path.suffix == ".gguf" else str(path)
    candidate = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(candidate):
        with open(candidate) as f:
            return f.read()
    return None
