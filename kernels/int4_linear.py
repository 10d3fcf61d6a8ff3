"""W4A16 linear layers: 4-bit integer weights in GPTQ's layout, 16-bit activations.

A weight [K = in, N = out] is stored as GPTQ stores it:
- `qweight` int32 [K / 8, N]: input row k = 8 i + j of output column n in bits 4j .. 4j+3 of
  qweight[i, n] (`pack_int4_rows`; an element is negative when row 8i + 7 holds 8..15);
- `scales` and `zeros` [G, N] (fp16/bf16/fp32, the same dtype): a scale and a zero point per
  group of input rows and output column. The zero point is a number, not GPTQ's packed `qzeros`
  (loaders unpack those, add v1's offset of one, gpu_worker/int4.py): 8 for symmetric weights,
  any value for asymmetric ones;
- `g_idx` (optional, int32 [K]): the group of each input row, for GPTQ's act-order (desc_act)
  checkpoints, whose groups follow a permutation of the rows. Without it row k is in group
  k // (K / G).

    W[k, n] = (q[k, n] - zeros[g(k), n]) * scales[g(k), n],    y = x W + b,

summed in fp32, rounded once to x's dtype (`w4a16_linear_ref`). On CUDA (bf16/fp16 x) the
product is kernels/triton_int4_linear.py's: the packed weights are read as they are (a quarter
of bf16's bytes) and dequantized in registers, one launch per projection. Elsewhere, and for
fp32 x, the reference runs. `Int4GroupWeight.quantize` rounds a float weight to this format
(round to nearest per group, GPTQ's RTN rule), for tests and dummy-weight loads.
"""

from __future__ import annotations

import os

import torch

PACK = 8  # 4-bit values in an int32
MAX_Q = 15
SYM_ZERO = 8.0  # GPTQ's symmetric zero point, (MAX_Q + 1) / 2
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_USE_TRITON = os.environ.get("PAGODA_KERNELS", "triton") != "torch"  # as kernels/__init__.py


def _use_triton(x: torch.Tensor) -> bool:
    return _USE_TRITON and x.is_cuda


# ---- packing -------------------------------------------------------------------------------


def _shifts(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(0, 4 * PACK, 4, dtype=dtype, device=device)


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """q integer [K, N] with values 0..15 (K a multiple of 8) -> int32 [K / 8, N], GPTQ's
    `qweight`: row 8i + j in bits 4j .. 4j+3 of element [i, n]. The words are formed in int64
    and wrapped to int32 (two's complement), so a row 8i + 7 of 8..15 gives a negative int32."""
    if q.dim() != 2 or q.shape[0] % PACK:
        raise ValueError(f"pack_int4_rows takes [K, N] with K a multiple of {PACK}, not {list(q.shape)}")
    if q.is_floating_point() or q.is_complex():
        raise ValueError(f"pack_int4_rows takes integer values, not {q.dtype}")
    k, n = q.shape
    parts = (q.to(torch.int64) & MAX_Q).reshape(k // PACK, PACK, n) << _shifts(q.device, torch.int64)[None, :, None]
    words = parts.sum(dim=1)  # disjoint bits: the sum is the bitwise or
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """`pack_int4_rows`'s inverse: int32 [K / 8, N] -> uint8 [K, N] of values 0..15."""
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"unpack_int4_rows takes int32 [K / 8, N], not {packed.dtype} {list(packed.shape)}")
    kp, n = packed.shape
    # int32 >> is arithmetic (a negative word shifts in ones), the mask keeps the nibble alone.
    q = (packed[:, None, :] >> _shifts(packed.device, torch.int32)[None, :, None]) & MAX_Q
    return q.reshape(kp * PACK, n).to(torch.uint8)


# ---- the reference -------------------------------------------------------------------------


def check_int4_weight(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | None
) -> tuple[int, int, int]:
    """(K, N, G) of a W4 weight, or ValueError for inconsistent shapes or dtypes (shapes only:
    nothing reads the device)."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight is int32 [K / 8, N], not {qweight.dtype} {list(qweight.shape)}")
    k, n = qweight.shape[0] * PACK, qweight.shape[1]
    if scales.dim() != 2 or scales.shape[1] != n or scales.shape != zeros.shape:
        raise ValueError(f"scales and zeros are [G, {n}], not {list(scales.shape)} and {list(zeros.shape)}")
    if scales.dtype not in SCALE_DTYPES or zeros.dtype != scales.dtype:
        raise ValueError(f"scales and zeros are fp16, bf16 or fp32 alike, not {scales.dtype} and {zeros.dtype}")
    g = scales.shape[0]
    if g_idx is not None:
        if g_idx.shape != (k,) or g_idx.is_floating_point():
            raise ValueError(f"g_idx holds an integer group per input row, [{k}], not {g_idx.dtype} "
                             f"{list(g_idx.shape)}")
    elif g == 0 or k % g:
        raise ValueError(f"without g_idx the {k} input rows are split into equal groups, not {g}")
    return k, n, g


def group_of_rows(k: int, num_groups: int, g_idx: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The group of each of the k input rows, int64 [k]: g_idx, or k // (K / G)."""
    if g_idx is not None:
        return g_idx.to(device=device, dtype=torch.int64)
    return torch.arange(k, device=device) // (k // num_groups)


def dequantize_int4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | None = None
) -> torch.Tensor:
    """The weight W [K, N] in fp32: (q - zero) * scale of each row's group (one fp32 product per
    element: q - zero is exact for the zero points of real checkpoints, integers up to 15)."""
    k, _, g = check_int4_weight(qweight, scales, zeros, g_idx)
    rows = group_of_rows(k, g, g_idx, qweight.device)
    return (unpack_int4_rows(qweight).float() - zeros.float()[rows]) * scales.float()[rows]


def w4a16_linear_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype: x times the dequantized weight (`dequantize_int4`) in
    fp32, the bias added, rounded once."""
    k, n, _ = check_int4_weight(qweight, scales, zeros, g_idx)
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {k} input rows")
    y = x.reshape(-1, k).float() @ dequantize_int4(qweight, scales, zeros, g_idx)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`w4a16_linear_ref`'s function: kernels/triton_int4_linear.py's kernels on CUDA for bf16
    and fp16 x (PAGODA_KERNELS not "torch"), the reference elsewhere."""
    if _use_triton(x) and x.dtype in (torch.bfloat16, torch.float16):
        from kernels.triton_int4_linear import w4a16_linear_triton

        return w4a16_linear_triton(x, qweight, scales, zeros, g_idx, bias)
    return w4a16_linear_ref(x, qweight, scales, zeros, g_idx, bias)


# ---- the weight ----------------------------------------------------------------------------


def _round_up_to(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 scales -> `dtype`, each at least its fp32 value (the next one up where the cast
    rounded down), so |w| / scale stays within the 4-bit range the fp32 scale allows."""
    stored = scale.to(dtype)
    up = torch.nextafter(stored, torch.full_like(stored, float("inf")))
    return torch.where(stored.float() < scale, up, stored)


class Int4GroupWeight:
    """A linear layer's weight in 4 bits, GPTQ's layout (the top of this file): `weight(x, bias)`
    is x W + b (`w4a16_linear`), W [in, out] dequantized from qweight int32 [in / 8, out], scales
    and zeros [G, out] and the optional act-order `g_idx` int32 [in]."""

    def __init__(
        self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | None = None
    ) -> None:
        self.in_features, self.out_features, self.num_groups = check_int4_weight(qweight, scales, zeros, g_idx)
        self.qweight = qweight.contiguous()
        self.scales = scales.contiguous()
        self.zeros = zeros.contiguous()
        self.g_idx = None if g_idx is None else g_idx.to(torch.int32).contiguous()

    @property
    def group_size(self) -> int | None:
        """Input rows per group; None with g_idx (the groups are then any sets of rows)."""
        return None if self.g_idx is not None else self.in_features // self.num_groups

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int, sym: bool = True) -> Int4GroupWeight:
        """Round a float weight [N, K] (nn.Linear's [out, in]) to nearest per group of
        `group_size` input columns (-1: one group over all of K), GPTQ's RTN rule:
        sym: scale = 2 max|w| / 15, zero 8; asym: scale = (max(w, 0) - min(w, 0)) / 15 (the range
        holds 0, as GPTQ's does, so 0 is exact), zero = round(-min / scale); then
        q = clamp(round(w / scale + zero), 0, 15). Scales and zeros are kept in the weight's
        dtype (fp32 for others), each scale rounded up to it, so every element is within half a
        step (scale / 2) of its weight; an all-zero group gets a tiny scale (the dtype's smallest
        normal) and dequantizes to zeros."""
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"quantize takes a float weight [N, K], not {weight.dtype} {list(weight.shape)}")
        n, k = weight.shape
        size = k if group_size == -1 else group_size
        if size <= 0 or k % size or k % PACK:
            raise ValueError(f"{k} input columns (a multiple of {PACK}) in groups of {group_size}: they must divide")
        dtype = weight.dtype if weight.dtype in SCALE_DTYPES else torch.float32
        groups = weight.detach().float().t().reshape(k // size, size, n)  # [G, size, N]
        if sym:
            scale = groups.abs().amax(dim=1) * (2.0 / MAX_Q)
        else:
            low, high = groups.amin(dim=1).clamp_max(0.0), groups.amax(dim=1).clamp_min(0.0)
            scale = (high - low) / MAX_Q
        scale = _round_up_to(scale.clamp_min(torch.finfo(dtype).tiny), dtype)
        s = scale.float()
        zero = torch.full_like(s, SYM_ZERO) if sym else torch.round(-low / s).clamp(0, MAX_Q)
        q = torch.round(groups / s[:, None, :] + zero[:, None, :]).clamp(0, MAX_Q).to(torch.int32)
        return cls(pack_int4_rows(q.reshape(k, n)), scale, zero.to(dtype))

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] in fp32 ([out, in], as nn.Linear keeps it)."""
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.g_idx).t()

    @property
    def nbytes(self) -> int:
        tensors = (self.qweight, self.scales, self.zeros) + (() if self.g_idx is None else (self.g_idx,))
        return sum(t.numel() * t.element_size() for t in tensors)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return w4a16_linear(x, self.qweight, self.scales, self.zeros, self.g_idx, bias)
