"""RMSNorm (optionally fused with the residual add) in Triton: one pass over each row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import pdl_begin, pdl_kwargs


@triton.jit(do_not_specialize=["num_rows"])
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    num_rows, eps,
    stride_x, stride_r, stride_o, stride_ro,
    N: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, ADD_RESIDUAL: tl.constexpr, PDL: tl.constexpr,
):
    """ROWS rows per program, each whole in registers: read once, written once."""
    pdl_begin(PDL)
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    ok = (rows < num_rows) & (cols < N)
    x = tl.load(x_ptr + rows * stride_x + cols, mask=ok, other=0.0)
    if ADD_RESIDUAL:
        # The sum is rounded to the activation dtype, as `x + residual` in PyTorch would be.
        x = (x.to(tl.float32) + tl.load(residual_ptr + rows * stride_r + cols, mask=ok, other=0.0).to(tl.float32))
        x = x.to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + rows * stride_ro + cols, x, mask=ok)
    xf = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, 1) / N + eps)
    normed = (xf * inv_rms[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=ok)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit rows of {n}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} differs from x {tuple(x.shape)} {x.dtype}")
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    out2 = out.view(-1, n)
    num_rows = x2.shape[0]
    block_n = triton.next_power_of_2(n)
    rows = max(1, min(16, 2048 // block_n))  # short rows (per-head q/k norms) share a program
    if residual is not None:
        r2 = residual.reshape(-1, n).contiguous()
        residual_out = torch.empty_like(x)
        ro2 = residual_out.view(-1, n)
    else:
        r2 = ro2 = x2  # never read: ADD_RESIDUAL is off
        residual_out = None
    if num_rows:
        _rms_norm_kernel[(triton.cdiv(num_rows, rows),)](
            x2, r2, weight, out2, ro2, num_rows, eps,
            x2.stride(0), r2.stride(0), out2.stride(0), ro2.stride(0),
            N=n, BLOCK_N=block_n, ROWS=rows, ADD_RESIDUAL=residual is not None,
            num_warps=min(16, max(1, rows * block_n // 512)), **pdl_kwargs(x.device),
        )
    return out, residual_out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm_ref`'s function: x [..., N], weight [N]."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_add_rms_norm_ref`'s function: (normed, x + residual) from one read of each input."""
    out, residual_out = _launch(x, residual, weight, eps)
    assert residual_out is not None
    return out, residual_out
