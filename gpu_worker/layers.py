"""The small layers the model families share: norms, rotary embedding, activations, linears.

Each module's computation is a function from `kernels` (`rms_norm`, `linear`, ...), which runs
the Triton kernel on CUDA tensors and its PyTorch reference elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernels import fused_add_rms_norm, linear, rms_norm

# ---- activations ---------------------------------------------------------------------------


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's "gelu_new": the tanh approximation of GELU."""
    return F.gelu(x, approximate="tanh")


# Hugging Face `activation_function` names -> the function.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


# ---- modules -------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual) in one pass: the residual stream's add fused in."""
        return fused_add_rms_norm(x, residual, self.weight, self.eps)


class Linear(nn.Linear):
    """nn.Linear through `kernels.linear` (which may take a Triton kernel for decode-sized inputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """One matmul for several projections of the same input (q/k/v, gate/up), stacked by rows.

    `output_sizes` are the row counts of the stacked projections, in order; the loader uses
    them to place each checkpoint tensor in its rows.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = output_sizes


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, neox/HF style: the two halves of a head form the pairs.

    The cos/sin table for every position is built on first use (the model is created on the
    meta device and only gets real storage once weights are loaded).
    """

    SCALINGS = ("default", "llama3", "linear", "freq_factors")

    def __init__(self, head_dim: int, max_position: int, theta: float, rope_scaling: dict | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.theta = theta
        self.rope_scaling = rope_scaling or {}
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def scaling_type(cls, rope_scaling: dict | None) -> str:
        """The scaling's type; ValueError for one not implemented, so loading fails, not serving."""
        scaling = rope_scaling or {}
        rope_type = scaling.get("rope_type", scaling.get("type")) or "default"
        if rope_type not in cls.SCALINGS:
            raise ValueError(f"rope scaling {rope_type!r} is not supported (supported: {', '.join(cls.SCALINGS)})")
        return rope_type

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        inv_freq = 1.0 / (self.theta ** (exponents / self.head_dim))
        rope_type = self.scaling_type(self.rope_scaling)
        if rope_type == "llama3":
            inv_freq = llama3_scaled_inv_freq(inv_freq, self.rope_scaling)
        elif rope_type == "linear":
            inv_freq = inv_freq / self.rope_scaling["factor"]
        elif rope_type == "freq_factors":  # llama.cpp's rope_freqs tensor: a divisor per frequency
            inv_freq = inv_freq / torch.tensor(self.rope_scaling["factors"], dtype=torch.float32, device=device)
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
