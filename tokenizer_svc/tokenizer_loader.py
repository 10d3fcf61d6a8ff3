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
from typing import Any

from protocol import EngineConfig

logger = logging.getLogger("pagoda.tokenizer")


class TokenizerLoadError(Exception):
    pass


def cache_dir() -> str:
    return os.environ.get("PAGODA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pagoda")


def _load_gguf_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = os.path.join(cache_dir(), "tokenizers", key)
    if os.path.isdir(cached):
        return AutoTokenizer.from_pretrained(cached)
    logger.info("converting the tokenizer of %s (once; cached in %s)", path, cached)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(cached))
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, cached)
    except OSError:  # another tokenizer process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def load_tokenizer(config: EngineConfig) -> Any:
    source = config.tokenizer or config.model
    if source is None:
        from gpu_worker.loader import embedded_gguf_path

        source = embedded_gguf_path()
    try:
        if source.endswith(".gguf"):
            tok = _load_gguf_tokenizer(source)
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(source, revision=config.revision)
    except Exception as e:
        raise TokenizerLoadError(f"cannot load a tokenizer from {source!r}: {e}") from e
    if config.chat_template:
        template = config.chat_template
        if os.path.isfile(template):
            with open(template) as f:
                template = f.read()
        tok.chat_template = template
    return tok
