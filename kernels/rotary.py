"""Rotary position embedding, neox / Hugging Face style: the two halves of a head form the pairs.

The kernels take cos and sin already gathered per token ([T, rotary_dim], both halves, as
`gpu_worker.layers.RotaryEmbedding.cos_sin` returns them), so every rope variant (Llama 3's
scaled frequencies included) is a matter of the table, built once in PyTorch.
"""

from __future__ import annotations

import torch


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] by its token's angles; cos, sin: [T, head_dim]."""
    cos, sin = cos[:, None], sin[:, None]
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat((-x2, x1), dim=-1), sin)  # x cos + rotate_half(x) sin
