"""From a Hugging Face config.json dict to the config a model is built with.

Two steps: `supported_hf_config` applies what Pagoda runs of the dict (a feature it lacks is a
ValueError, so loading fails with one line instead of serving wrong answers; a sliding window
caps the context), then the family's `from_hf` maps the field names to its config.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from gpu_worker.layers import ACTIVATIONS, RotaryEmbedding

if TYPE_CHECKING:
    from gpu_worker.models.base import CausalLM, ModelConfig

logger = logging.getLogger(__name__)


def build_model_config(model_class: type[CausalLM], hf: dict) -> ModelConfig:
    """`model_class`'s config for `hf`: ValueError for what is not supported, KeyError for a
    field missing."""
    return model_class.config_class.from_hf(supported_hf_config(hf))


def supported_hf_config(hf: dict) -> dict:
    """`hf` as Pagoda runs it: checked against what is implemented, its context capped at a
    sliding window (a new dict then; `hf` itself is never changed)."""
    RotaryEmbedding.scaling_type(rope_parameters(hf))
    if "activation_function" in hf and hf["activation_function"] not in ACTIVATIONS:
        name = hf["activation_function"]
        raise ValueError(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    if not hf.get("scale_attn_weights", True):  # GPT-2's switch for unscaled attention scores
        raise ValueError("scale_attn_weights=False is not supported")
    max_positions = hf.get("max_position_embeddings", 2048)
    window = sliding_window(hf)
    if window is not None and window < max_positions:
        # Sliding-window attention is not implemented; below the window it is exactly full
        # attention, so capping the context keeps every answer exact (Mistral-7B v0.1: 4096).
        logger.warning("sliding window attention is not supported: the context is capped at the window, %d", window)
        return {**hf, "max_position_embeddings": window}
    return hf


def rope_parameters(hf: dict) -> dict:
    """The rope settings, as transformers 5 (`rope_parameters`) or 4 (`rope_scaling`) spells them."""
    return hf.get("rope_parameters") or hf.get("rope_scaling") or {}


def sliding_window(hf: dict) -> int | None:
    """The window of the config's sliding-window attention; None if every layer attends fully."""
    window = hf.get("sliding_window")
    if hf.get("model_type") in ("qwen2", "qwen3"):
        # Qwen configs name a window that only use_sliding_window or layer_types switch on.
        uses_window = hf.get("use_sliding_window", False) or "sliding_attention" in (hf.get("layer_types") or [])
    else:
        uses_window = window is not None
    return window if uses_window and window else None
