"""Linear layers at decode batch sizes: y = x W^T (+ b) with W kept [out, in] as nn.Linear does."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in], weight [out, in], bias [out] -> [..., out]."""
    return F.linear(x, weight, bias)
