"""The small layers every decoder shares: RMSNorm, rotary embedding, SiLU-and-mul."""

from __future__ import annotations

import math

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 so bf16/fp16 activations keep their precision."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, neox/HF style: the two halves of a head form the pairs.

    The cos/sin table for every position is built on first use (the model is created on the
    meta device and only gets real storage once weights are loaded).
    """

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        theta: float,
        rope_scaling: dict | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.theta = theta
        self.rope_scaling = rope_scaling
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        inv_freq = 1.0 / (self.theta ** (exponents / self.head_dim))
        scaling = self.rope_scaling or {}
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type == "llama3":
            inv_freq = llama3_scaled_inv_freq(inv_freq, scaling)
        elif rope_type not in (None, "default"):
            raise NotImplementedError(f"rope scaling {rope_type!r} is not supported yet")
        return inv_freq

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at each position: two [T, head_dim] tensors in fp32."""
        if self._cos_sin is None or self._cos_sin[0].device != positions.device:
            t = torch.arange(self.max_position, device=positions.device).float()
            freqs = torch.outer(t, self.inv_freq(positions.device))
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos_sin = (emb.cos(), emb.sin())
        cos, sin = self._cos_sin
        return cos[positions], sin[positions]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, head_dim] by the angles of its token's position."""
        cos = cos[:, None].to(x.dtype)
        sin = sin[:, None].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        rotated_half = torch.cat((-x2, x1), dim=-1)
        return x * cos + rotated_half * sin


def llama3_scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's long-context rope: slow down low frequencies, keep high ones, blend between."""
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class SiluAndMul(nn.Module):
    """The SwiGLU gate: silu(gate) * up, with gate and up concatenated on the last dim."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return nn.functional.silu(gate) * up
