"""Rotary position embedding, neox / Hugging Face style: the two halves of a head form the pairs.

The kernels take cos and sin already gathered per token ([T, rotary_dim], both halves, as
`gpu_worker.layers.RotaryEmbedding.cos_sin` returns them), so every rope variant (Llama 3's
scaled frequencies included) is a matter of the table, built once in PyTorch.
"""

from __future__ import annotations

import torch


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] by its token's angles; cos, sin: [T, head_dim]."""
    cos = cos[:, None].to(x.dtype)
    sin = sin[:, None].to(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = x * cos  # + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1)
    out[..., :half].addcmul_(x2, sin[..., :half], value=-1)
    out[..., half:].addcmul_(x1, sin[..., half:])
    return out
