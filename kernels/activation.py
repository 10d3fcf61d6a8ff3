"""SiLU-and-mul: the SwiGLU gate of Llama-style MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, with x = [gate, up] concatenated on the last dim: [..., 2I] -> [..., I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
