"""Linear layers on 4-bit weights with a scale and a zero per group of 32 inputs.

A weight is a sum of P parts (P = 1 for GGUF's 4-bit formats, 2 for 8-bit ones split into a
high and a low nibble, gpu_worker/gguf_quant.py), each part's element being

    w[n, k] = (q[n, k] - 8) * scale[n, k // 32] + zero[n, k // 32],    q in 0..15

(the layout torch's int4 CPU kernel, `aten._weight_int4pack_mm_for_cpu`, reads). On a CPU with
AVX512-VNNI the weights are packed for kernels/cpu_decode.c's integer matmul instead (the same
weights; the activations quantized in the call, two int8 parts per group of 32; 1.25-1.7x
torch's kernel at the embedded model's decode shapes, docs/BENCHMARKS.md); elsewhere, or with
`dtype` given, the P parts are packed as one matrix of P * N rows for torch's kernel with bf16
(or the given) activations, and the parts' outputs added. `int4_linear_ref` is the reference
(dequantize in fp32, then one matmul), which also runs on any other device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import cpu_native

GROUP = 32
# The activations' dtype in the CPU kernel: its bf16 path is ~30x faster than its fp32 one, which
# the tests use to check a quantized model against transformers to fp32 precision.
KERNEL_DTYPE = torch.bfloat16


@dataclass
class Int4Parts:
    """q: uint8 [P, N, K] in 0..15; scale, zero: fp32 [P, N, K // 32]."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[1], self.q.shape[2])

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] in fp32."""
        w = (self.q.float() - 8) * self.scale.repeat_interleave(GROUP, -1) + self.zero.repeat_interleave(GROUP, -1)
        return w.sum(0)

    def padded(self, num_parts: int) -> Int4Parts:
        """The same weight in `num_parts` parts, the added ones zero (q 8, scale 0, zero 0)."""
        extra = num_parts - self.q.shape[0]
        if extra <= 0:
            return self
        return Int4Parts(
            torch.cat([self.q, torch.full((extra, *self.q.shape[1:]), 8, dtype=self.q.dtype)]),
            torch.cat([self.scale, torch.zeros(extra, *self.scale.shape[1:])]),
            torch.cat([self.zero, torch.zeros(extra, *self.zero.shape[1:])]),
        )

    @staticmethod
    def cat_rows(parts: list[Int4Parts]) -> Int4Parts:
        """Projections stacked by rows (q/k/v, gate/up), padded to the same number of parts."""
        num_parts = max(p.q.shape[0] for p in parts)
        parts = [p.padded(num_parts) for p in parts]
        return Int4Parts(*(torch.cat([getattr(p, f) for p in parts], dim=1) for f in ("q", "scale", "zero")))


def int4_linear_ref(x: torch.Tensor, parts: Int4Parts, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] against the dequantized weight, in x's dtype."""
    return F.linear(x, parts.dequantize().to(x.dtype), bias)


def use_int8_activations(dtype: torch.dtype | None) -> bool:
    """Whether a quantized weight takes kernels/cpu_decode.c's int8-activation kernel: the
    default (no dtype asked for) where this CPU has it (AVX512-VNNI and a C compiler)."""
    return dtype is None and KERNEL_DTYPE == torch.bfloat16 and cpu_native.int8_dot_supported()


def _native_input(x: torch.Tensor) -> torch.Tensor:
    """x as the C kernels take it: contiguous, fp32 or bf16."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    return x.contiguous()


class Int4Weight:
    """A weight packed for the CPU kernel: `weight(x)` is x W^T for x [..., K] of any float dtype."""

    native: cpu_native.PackedInt4 | None = None

    def __init__(self, parts: Int4Parts, dtype: torch.dtype | None = None) -> None:
        p, n, k = parts.q.shape
        if k % GROUP:
            raise ValueError(f"a 4-bit weight needs a multiple of {GROUP} inputs, not {k}")
        self.num_parts, self.out_features, self.in_features = p, n, k
        if use_int8_activations(dtype):
            self.native = cpu_native.PackedInt4(parts.q, parts.scale, parts.zero)
            return
        self.dtype = dtype or KERNEL_DTYPE  # the kernel's activation dtype
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(parts.q.reshape(p * n, k).to(torch.int32), 1)
        # [K // 32, P * N, 2]: each group's (scale, zero) for every packed row.
        self.scale_zero = torch.stack([parts.scale, parts.zero], dim=-1).reshape(p * n, k // GROUP, 2)
        self.scale_zero = self.scale_zero.transpose(0, 1).contiguous().to(self.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # A decode step calls this 4 times a layer: no reshape or view where x is already 2-D
        # (each skipped op is a few microseconds of dispatch on the CPU).
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self.native is not None:
            y = cpu_native.int4_matmul(_native_input(x2), self.native)
            y = y if y.dtype == x.dtype else y.to(x.dtype)
            return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2 if x2.dtype == self.dtype else x2.to(self.dtype), self.packed, GROUP, self.scale_zero
        )
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.num_parts > 1:
            y = y.view(-1, self.num_parts, self.out_features).sum(1)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)


class Int8RowWeight:
    """A weight re-quantized to int8 with one scale per output row, at an error of up to
    max|row| / 254 a weight, which is why the quantized LM head recomputes its best logits
    exactly (gpu_worker/layers.py). Multiplied by kernels/cpu_decode.c's integer kernel (int8
    activations per group of 64) where `use_int8_activations`, 1.8x torch's at the embedded
    model's LM head; else by torch's int8 CPU kernel (`aten._weight_int8pack_mm`, bf16
    activations)."""

    native: cpu_native.PackedInt8 | None = None

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        scale = weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        q = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        if use_int8_activations(dtype):
            self.native = cpu_native.PackedInt8(q, scale)
            return
        self.dtype = dtype or KERNEL_DTYPE
        self.q, self.scale = q, scale.to(self.dtype)

    def dequantize(self) -> torch.Tensor:
        if self.native is not None:
            return self.native.dequantize()
        return self.q.float() * self.scale.float()[:, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self.native is not None:
            y = cpu_native.int8_matmul(_native_input(x2), self.native)
        else:
            x2 = x2 if x2.dtype == self.dtype else x2.to(self.dtype)
            y = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)
