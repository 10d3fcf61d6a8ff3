"""RMSNorm, alone and fused with the residual add that precedes it in every decoder layer."""

from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dim, the statistics in fp32 (Hugging Face's rounding:
    the normalized x is cast back to x's dtype before the weight multiplies it)."""
    dtype = x.dtype
    if dtype == torch.float32:  # one operator, the same arithmetic (the CPU's path)
        return torch.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the sum, rounded to x's dtype, is the next residual."""
    residual = x + residual
    return rms_norm_ref(residual, weight, eps), residual
