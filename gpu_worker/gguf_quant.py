"""GGUF weights kept quantized: a tensor's blocks turned into the 4-bit parts of kernels/quant_linear.py.

Each row of a GGUF matrix is a run of blocks along the input dimension, so the unpacking is a
reshape of the raw bytes (vectorized numpy, the layouts of gguf-py's `dequantize_blocks`):

- Q4_0 (32 per block: d, 4-bit q): w = d (q - 8)           -> one part, scale d, zero 0
- Q4_1 (d, m, q):                   w = d q + m             -> one part, scale d, zero m + 8d
- Q4_K (256: d, dmin, 8 six-bit scale/min pairs, q):
                                    w = d sc q - dmin mn    -> one part per 32, scale d sc, zero 8 d sc - dmin mn
- Q8_0 (d, 8-bit x):                x + 128 = 16 hi + lo    -> two parts: (hi, 16d, 0) and (lo, d, 8d)
- Q6_K (256: 16 int8 scales of 16, 6-bit q): its 16-element scales do not fit a 32-group, so
  its values are re-quantized to 8 bits per group of 32 (scale max|w| / 127, an error of at
  most 1/254 of the group's largest weight, a quarter of Q6_K's own step), then split as Q8_0.

The first four are exact (scales and zeros in fp32); the kernel then rounds them to bf16.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from kernels.quant_linear import Int4Parts

T = gguf.GGMLQuantizationType
KEPT_QUANTIZED = (T.Q4_0, T.Q4_1, T.Q4_K, T.Q8_0, T.Q6_K)


class GGUFQuantized:
    """One GGUF matrix in its blocks: `data` uint8 [rows, bytes per row], `shape` (rows, cols) the
    Hugging Face way (rows = output features)."""

    def __init__(self, qtype: gguf.GGMLQuantizationType, data: np.ndarray, shape: tuple[int, int]) -> None:
        self.qtype = qtype
        self.data = data
        self.shape = shape

    def rows(self, start: int, stop: int) -> GGUFQuantized:
        return GGUFQuantized(self.qtype, self.data[start:stop], (stop - start, self.shape[1]))

    def full(self) -> GGUFQuantized:
        return self

    def take_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` dequantized to fp32 (an embedding lookup): [*ids.shape, cols]."""
        flat = ids.reshape(-1).numpy()
        values = gguf.quants.dequantize(self.data[flat], self.qtype).reshape(len(flat), self.shape[1])
        return torch.from_numpy(values).view(*ids.shape, self.shape[1])

    def dequantize(self) -> torch.Tensor:
        return torch.from_numpy(gguf.quants.dequantize(np.asarray(self.data), self.qtype).reshape(self.shape))

    def int4_parts(self) -> Int4Parts:
        n, k = self.shape
        unpack = _UNPACK.get(self.qtype)
        if unpack is None:
            raise ValueError(f"{self.qtype.name} is not kept quantized")
        block_size, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        blocks = np.ascontiguousarray(self.data).reshape(n * (k // block_size), type_size)
        q, scale, zero = unpack(blocks)
        parts = q.shape[0]
        return Int4Parts(
            torch.from_numpy(q.reshape(parts, n, k)),
            torch.from_numpy(scale.reshape(parts, n, k // 32)),
            torch.from_numpy(zero.reshape(parts, n, k // 32)),
        )


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, run: int) -> np.ndarray:
    """Bytes [B, m] -> 4-bit values [B, 2m]: each run of `run` bytes gives its low nibbles, then
    its high ones (GGUF's order)."""
    b = qs.shape[0]
    q = qs.reshape(b, -1, 1, run) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(b, -1)


def _q4_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(blocks[:, :2])
    return _nibbles(blocks[:, 2:], 16)[None], d.T, np.zeros_like(d.T)


def _q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    return _nibbles(blocks[:, 4:], 16)[None], d.T, (m + 8 * d).T


def _q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])
    scale = d * sc.astype(np.float32)  # [B, 8]
    zero = 8 * scale - dmin * mn.astype(np.float32)
    return _nibbles(blocks[:, 16:], 32)[None], scale.reshape(1, -1), zero.reshape(1, -1)


def _split_bytes(x: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-bit values x [B, 32] in -128..127 with scales d [B, 1] -> the high and the low nibble parts."""
    u = (x.astype(np.int16) + 128).astype(np.uint8)
    q = np.stack([u >> 4, u & 0x0F])
    d = d.reshape(1, -1)
    return q, np.concatenate([16 * d, d]), np.concatenate([np.zeros_like(d), 8 * d])


def _q8_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _split_bytes(np.ascontiguousarray(blocks[:, 2:]).view(np.int8), _f16(blocks[:, :2]))


def _q6_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    w = gguf.quants.dequantize(blocks, T.Q6_K).reshape(-1, 32)
    d = np.abs(w).max(axis=1, keepdims=True) / 127
    x = np.rint(np.divide(w, d, out=np.zeros_like(w), where=d > 0))
    return _split_bytes(np.clip(x, -127, 127).astype(np.int8), d)


_UNPACK = {T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q4_K: _q4_k, T.Q8_0: _q8_0, T.Q6_K: _q6_k}
