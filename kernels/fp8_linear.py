"""FP8 linear layers, W8A8 as vLLM runs them on Hopper: e4m3 weights with a scale per output
row, activations quantized to e4m3 as they arrive, one scale per token (or the checkpoint's
static scale per tensor), the product through `torch._scaled_mm` on CUDA.

    x ~ q_x * s_x (per row of x),  W ~ q_w * s_w (per row of W),
    y = s_x * s_w^T * (q_x q_w^T) + b,   the sum in fp32, rounded once to the output dtype.

A row's scale is its largest |value| / 448 (e4m3's largest finite value), at least MIN_SCALE
(vLLM's floor: an all-zero row quantizes to zeros instead of dividing 0 by 0); values are
divided by it (IEEE division), clamped to +-448 and rounded to the nearest e4m3. The same rule
quantizes weights at load (`Fp8Weight.quantize`: each output row is a "token").

On CUDA the activations are quantized by one Triton kernel (kernels/triton_fp8_linear.py; a
handful of PyTorch ops would be ~8 launches per projection, ~1,000 per decode step of a
32-layer model) and multiplied by `torch._scaled_mm` with row-wise scales: scale_a [M, 1] and
scale_b [1, N], fp32. Row-wise scaling is only guaranteed for a bf16 output in every torch
release, so the product is always asked for in bf16 (with the bias fused when the model runs
in bf16); other activation dtypes get it cast, bias added after. `_scaled_mm` also needs K and
N multiples of 16: other shapes (none of the usual models) take the reference on the GPU too.
Elsewhere `fp8_linear_ref` runs: the same quantization, the fp8 values multiplied exactly in
fp32 (a product of two e4m3 values is exact in fp32) and scaled after the sum, as the GPU does.

Decode-sized inputs (CUDA, bf16/fp16, at most 16 rows) take W8A16 instead
(`w8a16_linear_ref`; kernels/triton_fp8_linear.py's skinny kernel, one launch): x is not
quantized, the e4m3 weight is widened and multiplied with x in fp32, each output scaled by its
weight row's scale at the end. There a projection is a weight read, and `_scaled_mm` plus the
quantization launch were slower than the bf16 skinny kernel reading twice the bytes. The
activation's static `input_scale` and `input_scale_ub` are not used on this path: they only
say how to quantize x, and x unquantized is strictly more accurate (the result differs from
W8A8's by x's e4m3 rounding, ~2^-5 relative per value). PAGODA_SKINNY_LINEAR (as for bf16
weights, kernels/__init__.py): "0" turns the W8A16 path off (every CUDA input takes
`_scaled_mm`), "auto" (the default) and "1" use it for every shape of weight (the bf16 rule's
4,096-output cap is against cuBLAS's bf16 GEMV, not `_scaled_mm`).
"""

from __future__ import annotations

import os

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)
# _scaled_mm's row-wise output dtype in every release that has it (bf16 and fp16 came later).
SCALED_MM_OUT_DTYPE = torch.bfloat16
SCALED_MM_ALIGN = 16


_USE_TRITON = os.environ.get("PAGODA_KERNELS", "triton") != "torch"  # as kernels/__init__.py
_SKINNY_LINEAR = os.environ.get("PAGODA_SKINNY_LINEAR", "auto")  # as kernels/__init__.py ("0": off)
SKINNY_MAX_ROWS = 16  # kernels/triton_linear.py's MAX_ROWS


def _use_triton(x: torch.Tensor) -> bool:
    return _USE_TRITON and x.is_cuda


# ---- quantization --------------------------------------------------------------------------


def quantize_rows_ref(
    x: torch.Tensor, static_scale: torch.Tensor | None = None, scale_ub: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, 1]): a scale per row (amax / 448, at most
    scale_ub * 1 / 448 when an upper bound on amax is given, at least MIN_SCALE), or the one
    `static_scale` (a per-tensor scale, fp32, one element) for every row."""
    xf = x.float()
    if static_scale is not None:
        scale = static_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()
    else:
        amax = xf.abs().amax(dim=-1, keepdim=True)
        if scale_ub is not None:
            amax = amax.clamp_max(scale_ub)
        # Divided by a tensor, not the scalar: on CUDA torch divides by a scalar as a product
        # with its reciprocal, one rounding off the correctly rounded quotient the kernel takes.
        scale = (amax / torch.full_like(amax, FP8_MAX)).clamp_min(MIN_SCALE)
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_rows(
    x: torch.Tensor, static_scale: torch.Tensor | None = None, scale_ub: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows_ref`, by one Triton kernel on CUDA (the same numbers, bit for bit)."""
    if _use_triton(x):
        from kernels.triton_fp8_linear import quantize_rows_triton

        return quantize_rows_triton(x, static_scale, scale_ub)
    return quantize_rows_ref(x, static_scale, scale_ub)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [N, K] -> (e4m3 [N, K], fp32 scales [N]), one scale per output row."""
    q, scale = quantize_rows(weight)
    return q, scale.reshape(-1)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 [N, K] with a scale per row ([N] or [N, 1]) -> fp32 [N, K]."""
    return q.float() * scale.float().reshape(-1, 1)


# ---- the matmul ----------------------------------------------------------------------------


def fp8_linear_ref(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
    input_scale_ub: float | None = None,
) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype: x quantized (per token, or by the static
    `input_scale`), multiplied by the e4m3 weight [N, K] in fp32, scaled by both scales
    (`w_scale` [N]), the bias added, rounded once."""
    q, x_scale = quantize_rows_ref(x.reshape(-1, x.shape[-1]), input_scale, input_scale_ub)
    return _scaled_product_ref(x, q.float(), x_scale, w_fp8, w_scale, bias)


def _scaled_product_ref(
    x: torch.Tensor, x2: torch.Tensor, x_scale: torch.Tensor | None, w_fp8: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x2 [M, K] fp32 (x's rows, quantized or not) times the e4m3 weight [N, K] in fp32, scaled
    by x_scale [M, 1] (if any) and w_scale (N values), the bias added, rounded once to x's dtype
    and shape."""
    y = x2 @ w_fp8.float().t()
    if x_scale is not None:
        y = y * x_scale
    y = y * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], w_fp8.shape[0])


def w8a16_linear_ref(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype, x not quantized (W8A16): the e4m3 weight [N, K]
    widened to fp32, multiplied with x in fp32, each output scaled by its row's scale (`w_scale`,
    N values), the bias added, rounded once."""
    return _scaled_product_ref(x, x.reshape(-1, x.shape[-1]).float(), None, w_fp8, w_scale, bias)


def use_skinny_w8a16(x: torch.Tensor) -> bool:
    """Whether `fp8_linear` takes W8A16 (kernels/triton_fp8_linear.py's skinny kernel): CUDA and
    Triton kernels on, bf16/fp16 x of at most 16 rows, PAGODA_SKINNY_LINEAR not "0"."""
    return (_SKINNY_LINEAR != "0" and _use_triton(x) and x.dtype in (torch.bfloat16, torch.float16)
            and x.numel() <= SKINNY_MAX_ROWS * x.shape[-1])


def scaled_mm_supported(in_features: int, out_features: int) -> bool:
    """Whether `torch._scaled_mm` takes this weight shape (K and N multiples of 16)."""
    return in_features % SCALED_MM_ALIGN == 0 and out_features % SCALED_MM_ALIGN == 0


def scaled_mm_rowwise(
    q: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale_row: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """q [M, K] e4m3 (row-major), x_scale [M, 1] fp32; w_fp8 [N, K] e4m3 (row-major, so its
    transpose is the column-major operand cuBLAS/CUTLASS want), w_scale_row [1, N] fp32. The
    product in bf16 (SCALED_MM_OUT_DTYPE), then `out_dtype`; the bias fused when it is bf16."""
    fused = bias is not None and bias.dtype == SCALED_MM_OUT_DTYPE
    y = torch._scaled_mm(
        q, w_fp8.t(), scale_a=x_scale, scale_b=w_scale_row, bias=bias if fused else None,
        out_dtype=SCALED_MM_OUT_DTYPE,
    )
    if out_dtype != SCALED_MM_OUT_DTYPE:
        y = y.to(out_dtype)
    if bias is not None and not fused:
        y = y + bias
    return y


def fp8_linear(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
    input_scale_ub: float | None = None,
) -> torch.Tensor:
    """x W^T + b for an e4m3 weight [N, K] with a scale per row (w_scale [N] fp32): activations
    quantized per token (at most `input_scale_ub` / 448 a scale, fbgemm's bound), or by the
    checkpoint's static per-tensor `input_scale`. `torch._scaled_mm` on CUDA, the reference
    elsewhere and for shapes it does not take. Decode-sized CUDA inputs (`use_skinny_w8a16`)
    take W8A16 instead, x unquantized (`input_scale`, `input_scale_ub` unused; see the top)."""
    n, k = w_fp8.shape
    if use_skinny_w8a16(x):
        from kernels.triton_fp8_linear import fp8_linear_skinny_triton

        return fp8_linear_skinny_triton(x, w_fp8, w_scale, bias)
    if not x.is_cuda or not scaled_mm_supported(k, n):
        return fp8_linear_ref(x, w_fp8, w_scale, bias, input_scale, input_scale_ub)
    lead = x.shape[:-1]
    q, x_scale = quantize_rows(x.reshape(-1, k), input_scale, input_scale_ub)
    y = scaled_mm_rowwise(q, x_scale, w_fp8, w_scale.reshape(1, n), bias, x.dtype)
    return y.reshape(*lead, n)


class Fp8Weight:
    """A linear layer's weight in e4m3 with a scale per output row: `weight(x, bias)` is
    x W^T + b (`fp8_linear`). `input_scale`: the checkpoint's static per-tensor activation
    scale (None: dynamic per token); `input_scale_ub`: fbgemm's bound on a token's amax."""

    def __init__(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor,
        input_scale: torch.Tensor | None = None,
        input_scale_ub: float | None = None,
    ) -> None:
        if weight.dtype != FP8_DTYPE or weight.dim() != 2:
            raise ValueError(f"an FP8 weight is a float8_e4m3fn matrix, not {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        if scale.numel() != self.out_features:
            raise ValueError(f"an FP8 weight of {self.out_features} rows needs as many scales, not {scale.numel()}")
        self.weight = weight.contiguous()
        self.scale = scale.float().reshape(1, self.out_features).contiguous()  # [1, N]: scale_b's layout
        self.input_scale = None if input_scale is None else input_scale.float().reshape(()).clone()
        self.input_scale_ub = input_scale_ub

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Fp8Weight:
        """Quantize a 16/32-bit weight [N, K] (a scale per output row)."""
        return cls(*quantize_weight(weight))

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] in fp32."""
        return dequantize(self.weight, self.scale)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + 4 * self.scale.numel()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.scale, bias, self.input_scale, self.input_scale_ub)
