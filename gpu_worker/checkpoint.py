"""Reading a Hugging Face model folder: config.json, EOS ids and the weights as named tensors.

Weights are safetensors (one file, or shards named by model.safetensors.index.json); a
folder with only PyTorch `*.bin` files (older hub repos such as facebook/opt-125m) is read
with `torch.load(weights_only=True)`, which runs no pickled code.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gpu_worker.weight_source import WeightSource
from tokenizer_svc.model_source import ModelLoadError

# What reading a damaged or foreign file raises, turned into one ModelLoadError line.
READ_ERRORS = (OSError, ValueError, RuntimeError, EOFError, SafetensorError, pickle.UnpicklingError)


@dataclass
class Checkpoint:
    """What a format reader produces: enough to build the module and fill it."""

    hf_config: dict
    eos_token_ids: list[int]
    num_tensors: int | None  # for the progress bar; None when unknown before reading
    tensors: Iterator[tuple[str, torch.Tensor | WeightSource]]  # Hugging Face names
    dtype: torch.dtype | None = None  # the dtype the weights are stored in; None if quantized
    # Safetensors: each tensor's stored dtype by name ("BF16", "F8_E4M3", ...), from the files'
    # headers before any weight is read (an FP8 checkpoint's layers are known up front); else None.
    stored_dtypes: dict[str, str] | None = None


def read_hf_folder(folder: Path, weights: bool = True) -> Checkpoint:
    """The folder's config, EOS ids and stored dtype, and its weights unless `weights` is False
    (`--load-format dummy` makes its own)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder} has no config.json (is it a Hugging Face model folder?)")
    try:
        hf_config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {config_file}: {e}") from None
    eos = _as_list(hf_config.get("eos_token_id"))
    generation_config = folder / "generation_config.json"
    if generation_config.is_file():
        eos = _as_list(json.loads(generation_config.read_text()).get("eos_token_id")) + eos
    dtype_name = hf_config.get("dtype") or hf_config.get("torch_dtype")
    dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
    if not weights:
        return Checkpoint(hf_config, list(dict.fromkeys(eos)), 0, iter(()), dtype)

    files = _weight_files(folder, "model.safetensors")
    stored = None
    if files:
        stored = _stored_dtypes(files)
        num_tensors, tensors = len(stored), _iter_safetensors(files)
    else:
        files = _weight_files(folder, "pytorch_model.bin")
        if not files:
            raise ModelLoadError(f"no weights in {folder}: expected *.safetensors or pytorch_model*.bin files")
        num_tensors, tensors = None, _iter_torch_bin(files)
    return Checkpoint(hf_config, list(dict.fromkeys(eos)), num_tensors, tensors, dtype, stored)


def _weight_files(folder: Path, single: str) -> list[Path]:
    """The files of one format: the shards its index names, else the single file, else a glob.

    The index comes first because a folder may also hold other copies that it leaves out.
    """
    index = folder / f"{single}.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot read {index}: {e!r}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index.name} names shards missing from {folder}: {', '.join(missing)}")
        return files
    if (folder / single).is_file():
        return [folder / single]
    stem, suffix = single.split(".")
    return sorted(folder.glob(f"*.{suffix}" if suffix == "safetensors" else f"{stem}*.{suffix}"))


@contextmanager
def _reading(file: Path) -> Iterator[None]:
    try:
        yield
    except READ_ERRORS as e:
        raise ModelLoadError(f"cannot read weights file {file} (corrupt or incomplete?): {e}") from None


def _stored_dtypes(files: list[Path]) -> dict[str, str]:
    """Every tensor's name and stored dtype, from the headers (no tensor data is read)."""
    stored = {}
    for file in files:
        with _reading(file), safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                stored[name] = f.get_slice(name).get_dtype()
    return stored


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, WeightSource]]:
    """Each tensor unread: the model reads the slice its rank keeps (gpu_worker/weight_source.py)."""
    for file in files:
        with _reading(file), safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, WeightSource(f.get_slice(name))


def _iter_torch_bin(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with _reading(file):
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(state, dict):
            raise ModelLoadError(f"{file} does not hold a state dict")
        yield from state.items()


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)
