"""The CPU worker's kernels in C (kernels/cpu_decode.c), loaded through ctypes.

A decode step of a small model on a CPU spends more time dispatching PyTorch operators on
vectors of a few hundred elements than in its matmuls (docs/BENCHMARKS.md): an RMSNorm is ~10
operators, rotary with the K/V write ~15, attention over the paged cache ~10. The C file does
each of those in one call, and also the quantized matmuls on AVX512-VNNI (`PackedInt4`,
`PackedInt8`, used by kernels/quant_linear.py) and the selections over a row of logits. It is
compiled on first use with the machine's C compiler (`cc`, or $CC) for this very CPU
(-march=native) and kept under $PAGODA_CACHE_DIR/cpu-kernels, keyed by the source, the
compiler's version and the CPU; in a process where that fails (no compiler) PyTorch runs
instead, with one warning. `PAGODA_CPU_NATIVE=0` turns it off (the references then run, as they
do for anything the C functions do not cover: fp16 or fp8 tensors, non-contiguous ones).

Each wrapper of a per-layer operator returns None where it does not apply, and the caller runs
the reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_decode.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}

_lib: ctypes.CDLL | None = None
_tried = False

_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "pg_rms_norm": [_P, _P, _P, _I, _P, _I, _P, _I, _L, _L, _F],
    "pg_silu_and_mul": [_P, _I, _P, _I, _L, _L],
    "pg_rope_write_kv": [_P, _I, _L, _L, _L, _L, _P, _P, _P, _P, _I, _F, _P, _P, _P, _P],
    "pg_decode_attention": [_P, _I, _P, _P, _I, _P, _L, _P, _L, _L, _L, _L, _L, _F, _P, _I],
    "pg_int8_dot_supported": [],
    "pg_topk": [_P, _I, _L, _L, _L, _P],
    "pg_argmax": [_P, _I, _L, _L, _P],
    "pg_int4_matmul": [_P, _I, _L, _L, _P, _P, _P, _L, _L, _L, _L, _P, _I],
    "pg_int8_matmul": [_P, _I, _L, _L, _P, _P, _L, _L, _P, _I],
    "pg_decoder_layers": [_P, _P, _P, _P],
}


# Read once: the wrappers run ~150 times a decode step (tests and A/B timings set it directly).
ENABLED = os.environ.get("PAGODA_CPU_NATIVE", "1") != "0"


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "".join(lines)


def _compiler_version(cc: str) -> str:
    return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout


def library_path(cc: str) -> Path:
    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join(FLAGS).encode() + _compiler_version(cc).encode() + _cpu_identity().encode()
    ).hexdigest()[:16]
    root = os.environ.get("PAGODA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pagoda")
    return Path(root) / "cpu-kernels" / f"cpu_decode-{key}.so"


def _compile(cc: str, target: Path) -> None:
    """Build into a temporary file beside `target`, renamed into place: processes starting
    together never load half a library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300, check=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library() -> ctypes.CDLL | None:
    """The compiled library, built on first use; None where it is off or cannot be built."""
    global _lib, _tried
    if _tried or not ENABLED:
        return _lib if ENABLED else None
    _tried = True
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    try:
        if cc is None:
            raise FileNotFoundError("no C compiler (cc, gcc or $CC) on PATH")
        path = library_path(cc)
        if not path.exists():
            _compile(cc, path)
        lib = ctypes.CDLL(str(path))
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        _lib = lib
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or ""
        logger.warning("the CPU kernels in C are not built (%s %s); PyTorch's operators run instead", e, detail)
    return _lib


def _usable(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype in _DTYPES and not t.is_cuda and t.is_contiguous())


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(status: int, name: str) -> None:
    if status == 1:
        raise MemoryError(f"{name}: the C kernel could not allocate its buffers")
    if status:
        raise RuntimeError(f"{name}: the C kernel refused its arguments (status {status})")


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(rms_norm(x [+ residual]) * weight, x + residual or None), as kernels/norm.py rounds; None
    where the C function does not apply."""
    lib = library()
    if (
        lib is None
        or not _usable(x)
        or not _usable(weight)
        or (residual is not None and (residual.dtype != x.dtype or not residual.is_contiguous()))
    ):
        return None
    dim = x.shape[-1]
    out = torch.empty_like(x)
    res_out = None if residual is None else torch.empty_like(x)
    dt = _DTYPES[x.dtype]
    _check(lib.pg_rms_norm(
        x.data_ptr(), _ptr(residual), _ptr(res_out), dt, weight.data_ptr(), _DTYPES[weight.dtype],
        out.data_ptr(), dt, x.numel() // dim, dim, eps,
    ), "rms_norm")
    return out, res_out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor | None:
    lib = library()
    if lib is None or not _usable(x):
        return None
    d = x.shape[-1] // 2
    out = x.new_empty(*x.shape[:-1], d)
    dt = _DTYPES[x.dtype]
    _check(lib.pg_silu_and_mul(x.data_ptr(), dt, out.data_ptr(), dt, x.numel() // (2 * d), d), "silu_and_mul")
    return out


def rope_write_kv(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
) -> torch.Tensor | None:
    """As kernels/qkv.py's `rope_write_kv_ref` for a cache in the model's dtype; None otherwise."""
    lib = library()
    if (
        lib is None
        or not _usable(qkv)
        or not _usable(k_cache)
        or not _usable(v_cache)
        or not _usable(q_norm_weight)
        or not _usable(k_norm_weight)
        or k_cache.dtype != qkv.dtype
        or cos.dtype != torch.float32
        or sin.dtype != torch.float32
        or not cos.is_contiguous()
        or not sin.is_contiguous()
        or slot_mapping.dtype != torch.int64
        or (q_norm_weight is None) != (k_norm_weight is None)
        or (q_norm_weight is not None and q_norm_weight.dtype != k_norm_weight.dtype)
    ):
        return None
    tokens, head_dim = qkv.shape[0], k_cache.shape[-1]
    if qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim:
        return None  # the reference raises the error that names the shapes
    q = qkv.new_empty(tokens, num_heads, head_dim)
    norm_dt = _DTYPES[q_norm_weight.dtype] if q_norm_weight is not None else 0
    _check(lib.pg_rope_write_kv(
        qkv.data_ptr(), _DTYPES[qkv.dtype], tokens, num_heads, num_kv_heads, head_dim, cos.data_ptr(),
        sin.data_ptr(), _ptr(q_norm_weight), _ptr(k_norm_weight), norm_dt, eps, k_cache.data_ptr(),
        v_cache.data_ptr(), slot_mapping.contiguous().data_ptr(), q.data_ptr(),
    ), "rope_write_kv")
    return q


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int | None = None,
) -> torch.Tensor | None:
    """One query per sequence, [B, heads, d] -> [B, heads, d], over each one's paged context (as
    kernels/paged_attention.py's `decode_attention`), (sequence, KV head) pairs over OpenMP's
    threads; None for an fp8 cache. Faster than the SDPA path at every size measured (batch 1
    to 64, contexts 100 to 2,000: docs/BENCHMARKS.md)."""
    lib = library()
    if (
        lib is None
        or not _usable(q)
        or not _usable(k_cache)
        or k_cache.dtype != v_cache.dtype
        or block_tables.dtype != torch.int32
        or seq_lens.dtype != torch.int32
        or not block_tables.is_contiguous()
        or not seq_lens.is_contiguous()
    ):
        return None
    b, num_heads, d = q.shape
    out = torch.empty_like(q)
    _check(lib.pg_decode_attention(
        q.data_ptr(), _DTYPES[q.dtype], k_cache.data_ptr(), v_cache.data_ptr(), _DTYPES[k_cache.dtype],
        block_tables.data_ptr(), block_tables.shape[1], seq_lens.data_ptr(), b, num_heads, k_cache.shape[2], d,
        k_cache.shape[1], scale, out.data_ptr(), _DTYPES[q.dtype],
    ), "decode_attention")
    return out


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor | None:
    """x [rows, V] -> [rows, k] int64: the indices of each row's k largest values, in no
    particular order (NaN the largest); torch.topk sorts and took ~450 us over 49k logits."""
    lib = library()
    if lib is None or not _usable(x) or x.dim() != 2 or not 0 < k <= x.shape[1]:
        return None
    idx = torch.empty(x.shape[0], k, dtype=torch.int64)
    _check(lib.pg_topk(x.data_ptr(), _DTYPES[x.dtype], x.shape[0], x.shape[1], k, idx.data_ptr()), "topk")
    return idx


def argmax_rows(x: torch.Tensor) -> torch.Tensor | None:
    """x [rows, V] -> [rows] int64, as `x.argmax(-1)` (first maximum, NaN the largest)."""
    lib = library()
    if lib is None or not _usable(x) or x.dim() != 2 or x.shape[1] == 0:
        return None
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _check(lib.pg_argmax(x.data_ptr(), _DTYPES[x.dtype], x.shape[0], x.shape[1], out.data_ptr()), "argmax")
    return out


# ---- Quantized matmuls (int8 activations, AVX512-VNNI) ----


def int8_dot_supported() -> bool:
    """Whether the quantized matmuls are built: this CPU has AVX512-VNNI (and the library built)."""
    lib = library()
    return lib is not None and bool(lib.pg_int8_dot_supported())


class PackedInt4:
    """A 4-bit weight of P parts (kernels/quant_linear.py's `Int4Parts`) for `pg_int4_matmul`:
    per row, quads of 4 groups of 32 inputs in 64 bytes, lane l (4 bytes) holding group l % 4's
    inputs 4 (l // 4) .. + 3 in its low nibbles and 16 + 4 (l // 4) .. + 3 in its high ones
    (kernels/cpu_decode.c); per group w = (q - 8) d + z, d and z in bf16 (as PyTorch's 4-bit
    kernel keeps them: the same weights), G padded to 16 with zeros."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        p, n, k = q.shape
        g = k // 32
        self.num_parts, self.out_features, self.in_features = p, n, k
        self.quads, self.groups16 = -(-g // 4), -(-g // 16) * 16
        groups = torch.nn.functional.pad(q.reshape(p * n, g, 32).to(torch.uint8), (0, 0, 0, 4 * self.quads - g))
        # [rows, Q, 4 groups, 2 halves, 4 lanes' runs, 4] -> [rows, Q, runs, groups, 4]: lane = run * 4 + group
        runs = groups.view(p * n, self.quads, 4, 2, 4, 4).permute(0, 1, 3, 4, 2, 5)
        self.nib = (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(p * n, self.quads, 64).contiguous()
        pad = (0, self.groups16 - g)
        self.d = torch.nn.functional.pad(scale.reshape(p * n, g), pad).to(torch.bfloat16).contiguous()
        self.z = torch.nn.functional.pad(zero.reshape(p * n, g), pad).to(torch.bfloat16).contiguous()


def _packed_lib() -> ctypes.CDLL:
    """The library a packed weight was made for (packing asked `int8_dot_supported` first)."""
    if _lib is None:
        raise RuntimeError("a weight packed for the C kernels, but they are not loaded")
    return _lib


def int4_matmul(x: torch.Tensor, w: PackedInt4) -> torch.Tensor:
    """x [M, K] (contiguous, fp32 or bf16) -> [M, N] in x's dtype."""
    lib = _packed_lib()
    m = x.shape[0]
    y = x.new_empty(m, w.out_features)
    status = lib.pg_int4_matmul(
        x.data_ptr(), _DTYPES[x.dtype], m, w.in_features, w.nib.data_ptr(), w.d.data_ptr(), w.z.data_ptr(),
        w.num_parts, w.out_features, w.quads, w.groups16, y.data_ptr(), _DTYPES[x.dtype],
    )
    _check(status, "int4_matmul")
    return y


class PackedInt8:
    """Int8 rows with a scale each (kernels/quant_linear.py's `Int8RowWeight`) for
    `pg_int8_matmul`: stored as q + 128 in uint8 (VNNI multiplies unsigned by signed bytes),
    the inputs padded to groups of 64 with 128s (zeros)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        n, k = q.shape
        self.out_features, self.in_features, self.groups = n, k, -(-k // 64)
        wu = (q.to(torch.int16) + 128).to(torch.uint8)
        self.wu = torch.nn.functional.pad(wu, (0, 64 * self.groups - k), value=128).contiguous()
        self.scale = scale.float().contiguous()

    def dequantize(self) -> torch.Tensor:
        return (self.wu[:, : self.in_features].float() - 128) * self.scale[:, None]


def int8_matmul(x: torch.Tensor, w: PackedInt8) -> torch.Tensor:
    """x [M, K] (contiguous, fp32 or bf16) -> [M, N] in x's dtype."""
    lib = _packed_lib()
    m = x.shape[0]
    y = x.new_empty(m, w.out_features)
    status = lib.pg_int8_matmul(
        x.data_ptr(), _DTYPES[x.dtype], m, w.in_features, w.wu.data_ptr(), w.scale.data_ptr(), w.out_features,
        w.groups, y.data_ptr(), _DTYPES[x.dtype],
    )
    _check(status, "int8_matmul")
    return y


# ---- A decode step's decoder layers in one call ----


class _Int4(ctypes.Structure):
    _fields_ = [("nib", _P), ("d", _P), ("z", _P), ("parts", _L), ("rows", _L), ("quads", _L), ("groups16", _L),
                ("in_features", _L)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _P), ("post_norm", _P), ("q_norm", _P), ("k_norm", _P), ("qkv", _Int4), ("o", _Int4),
                ("gate_up", _Int4), ("down", _Int4), ("k_cache", _P), ("v_cache", _P)]


class _Step(ctypes.Structure):
    _fields_ = [("num_layers", _L), ("tokens", _L), ("hidden", _L), ("heads", _L), ("kv_heads", _L),
                ("head_dim", _L), ("intermediate", _L), ("block_size", _L), ("table_stride", _L), ("dt", _I),
                ("norm_dt", _I), ("qk_norm_dt", _I), ("eps", _F), ("qk_eps", _F), ("scale", _F), ("cos", _P),
                ("sin", _P), ("slot_mapping", _P), ("block_tables", _P), ("seq_lens", _P)]


@dataclass
class LayerWeights:
    """One Llama-style decoder layer as `pg_decoder_layers` takes it (no biases)."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    qkv: PackedInt4
    o: PackedInt4
    gate_up: PackedInt4
    down: PackedInt4
    k_cache: torch.Tensor
    v_cache: torch.Tensor


def _int4(w: PackedInt4) -> _Int4:
    return _Int4(w.nib.data_ptr(), w.d.data_ptr(), w.z.data_ptr(), w.num_parts, w.out_features, w.quads, w.groups16,
                 w.in_features)


class DecoderStack:
    """A model's decoder layers for `pg_decoder_layers`: a decode step's layers in one call, the
    same operators in the same order as the Python path (kernels/cpu_decode.c), so the same
    numbers; `None` from `make` where it does not apply (then the Python path runs)."""

    def __init__(self, layers: list[LayerWeights], heads: int, kv_heads: int, head_dim: int, eps: float,
                 qk_eps: float, scale: float) -> None:
        self.layers = layers  # keeps every tensor the pointers below point into alive
        first = layers[0]
        self.dt = _DTYPES[first.k_cache.dtype]
        self.norm_dt = _DTYPES[first.input_norm.dtype]
        self.qk_norm_dt = _DTYPES[first.q_norm.dtype] if first.q_norm is not None else 0
        self.hidden, self.intermediate = first.qkv.in_features, first.down.in_features
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.eps, self.qk_eps, self.scale = eps, qk_eps, scale
        self.block_size = first.k_cache.shape[1]
        self.array = (_Layer * len(layers))(*[
            _Layer(w.input_norm.data_ptr(), w.post_norm.data_ptr(), _ptr(w.q_norm), _ptr(w.k_norm), _int4(w.qkv),
                   _int4(w.o), _int4(w.gate_up), _int4(w.down), w.k_cache.data_ptr(), w.v_cache.data_ptr())
            for w in layers
        ])

    @classmethod
    def make(cls, layers: list[LayerWeights], heads: int, kv_heads: int, head_dim: int, eps: float, qk_eps: float,
             scale: float) -> DecoderStack | None:
        if not layers or not int8_dot_supported():
            return None
        first = layers[0]
        dt = first.k_cache.dtype
        hidden, inter = first.qkv.in_features, first.down.in_features
        for w in layers:
            norms = [w.input_norm, w.post_norm] + ([w.q_norm, w.k_norm] if w.q_norm is not None else [])
            if (
                any(not _usable(t) or t.dtype != first.input_norm.dtype or t.numel() == 0 for t in norms[:2])
                or any(not _usable(t) or t.dtype != norms[2].dtype for t in norms[2:])
                or (w.q_norm is None) != (w.k_norm is None)
                or (w.q_norm is None) != (first.q_norm is None)
                or not _usable(w.k_cache) or not _usable(w.v_cache)
                or w.k_cache.dtype != dt or w.v_cache.dtype != dt
                or w.k_cache.shape[1:] != (first.k_cache.shape[1], kv_heads, head_dim)
                or (w.qkv.in_features, w.qkv.out_features) != (hidden, (heads + 2 * kv_heads) * head_dim)
                or (w.o.in_features, w.o.out_features) != (heads * head_dim, hidden)
                or (w.gate_up.in_features, w.gate_up.out_features) != (hidden, 2 * inter)
                or (w.down.in_features, w.down.out_features) != (inter, hidden)
            ):
                return None
        return cls(layers, heads, kv_heads, head_dim, eps, qk_eps, scale)

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """h [T, hidden] (the embeddings; one decode a sequence) -> (the last layer's MLP output,
        the residual stream before it); None where the step's tensors do not fit."""
        lib = library()
        t = h.shape[0]
        if (
            lib is None
            or _DTYPES.get(h.dtype) != self.dt
            or h.shape[1] != self.hidden
            or cos.dtype != torch.float32 or sin.dtype != torch.float32
            or not cos.is_contiguous() or not sin.is_contiguous()
            or slot_mapping.dtype != torch.int64 or not slot_mapping.is_contiguous()
            or block_tables.dtype != torch.int32 or not block_tables.is_contiguous()
            or seq_lens.dtype != torch.int32 or not seq_lens.is_contiguous()
            or seq_lens.shape[0] != t or slot_mapping.shape[0] != t
        ):
            return None
        out = h.clone(memory_format=torch.contiguous_format)
        residual = torch.empty_like(out)
        step = _Step(len(self.layers), t, self.hidden, self.heads, self.kv_heads, self.head_dim, self.intermediate,
                     self.block_size, block_tables.shape[1], self.dt, self.norm_dt, self.qk_norm_dt, self.eps,
                     self.qk_eps, self.scale, cos.data_ptr(), sin.data_ptr(), slot_mapping.data_ptr(),
                     block_tables.data_ptr(), seq_lens.data_ptr())
        _check(lib.pg_decoder_layers(ctypes.addressof(self.array), ctypes.addressof(step), out.data_ptr(),
                                     residual.data_ptr()), "decoder_layers")
        return out, residual
