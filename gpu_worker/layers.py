"""The small layers the model families share: norms, rotary embedding, activations, linears,
and the tensor-parallel linears and embeddings (gpu_worker/parallel.py says how they split).

Each module's computation is a function from `kernels` (`rms_norm`, `linear`, ...), which runs
the Triton kernel on CUDA tensors and its PyTorch reference elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.gguf_quant import GGUFQuantized
from gpu_worker.parallel import all_reduce, shard, tp
from gpu_worker.weight_source import WeightSource
from kernels import fused_add_rms_norm, linear, rms_norm, topk_indices
from kernels.fp8_linear import FP8_DTYPE, Fp8Weight
from kernels.int4_linear import Int4GroupWeight, pack_int4_rows, unpack_int4_rows
from kernels.quant_linear import Int4Parts, Int4Weight, Int8RowWeight

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


# An FP8 checkpoint's per-layer tensors besides `weight` (gpu_worker/fp8.py).
FP8_SCALES = ("weight_scale", "input_scale")
# A GPTQ / AWQ checkpoint's per-layer tensors instead of `weight` (gpu_worker/int4.py).
INT4_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


class Linear(nn.Linear):
    """nn.Linear through `kernels.linear` (which may take a Triton kernel for decode-sized inputs),
    whole on every rank; or, for a GGUF's quantized matrices on the CPU, through the 4-bit kernel
    (`int4`, then `weight` is None); or in FP8 with a scale per output row (`fp8`,
    kernels/fp8_linear.py: W8A8 through `torch._scaled_mm`, W8A16 for decode-sized inputs; then
    `weight` is None too)."""

    int4: Int4Weight | None = None
    fp8: Fp8Weight | None = None
    w4: Int4GroupWeight | None = None  # GPTQ / AWQ 4-bit groups (gpu_worker/int4.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.fp8 is not None:
            return self.fp8(x, bias)
        if self.w4 is not None:
            return self.w4(x, bias)
        if self.int4 is None:
            return linear(x, self.weight, bias)
        y = self.int4(x)
        return y if bias is None else y + bias

    # ---- FP8 (gpu_worker/fp8.py) ----

    def quantize_fp8(self) -> None:
        """`--quantization fp8`: this rank's loaded weight (its rows or input columns: a scale
        per row stays exact under either split) to e4m3 with a scale per output row; the 16/32-bit
        weight is dropped."""
        self.fp8 = Fp8Weight.quantize(self.weight.data)
        self.weight = None

    def expect_fp8(self, static_input: bool) -> None:
        """Take an FP8 checkpoint's tensors as they are: `weight` in e4m3, `weight_scale` (one per
        row of this rank; a per-tensor scale is spread over its projection's rows) and, for static
        activation scales, `input_scale` (one per stacked projection). `finish_fp8` packs them."""
        device = self.weight.device
        self.weight = nn.Parameter(torch.empty(self.weight.shape, dtype=FP8_DTYPE, device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(self.out_features, dtype=torch.float32, device=device),
                                         requires_grad=False)
        if static_input:
            parts = len(getattr(self, "output_sizes", [0]))
            self.input_scale = nn.Parameter(torch.empty(parts, dtype=torch.float32, device=device), requires_grad=False)

    def finish_fp8(self, input_scale_ub: float | None = None) -> None:
        """The loaded FP8 tensors -> `fp8`. Stacked projections share their input, and so one
        static input scale: the largest of theirs (vLLM's choice; nothing is clipped)."""
        input_scale = self.input_scale.data.max() if "input_scale" in self._parameters else None
        self.fp8 = Fp8Weight(self.weight.data, self.weight_scale.data, input_scale, input_scale_ub)
        self.weight = None
        for name in FP8_SCALES:
            self._parameters.pop(name, None)

    def _load_fp8_scale(self, name: str, src: WeightSource, rows: int, blocks: list[tuple[int, int, int, int]]) -> None:
        """A checkpoint's FP8 scale for a tensor of `rows` rows into this rank's: `blocks` are
        (our first row, the checkpoint's first row, rows, projection) for each projection it holds.
        A weight scale is per tensor ([] or [1]; spread over the rows: exact) or per row ([rows]
        or [rows, 1]); an input scale is per tensor."""
        shape = tuple(src.shape)
        per_tensor = shape in ((), (1,))
        if not per_tensor and (name == "input_scale" or shape not in ((rows,), (rows, 1))):
            expected = "[] or [1]" if name == "input_scale" else f"[], [1], [{rows}] or [{rows}, 1]"
            raise ValueError(f"has shape {list(shape)}, expected {expected} (for {name})")
        for dest, start, size, part in blocks:
            if name == "input_scale":
                self.input_scale.data[part] = src.full().reshape(())
            elif per_tensor:
                self.weight_scale.data[dest : dest + size] = src.full().reshape(()).float()
            else:
                self.weight_scale.data[dest : dest + size] = src.rows(start, start + size).float().reshape(size)

    # ---- GPTQ / AWQ (gpu_worker/int4.py) ----

    def expect_int4(self, g_idx: bool) -> None:
        """Take a GPTQ / AWQ checkpoint's tensors for this layer instead of `weight`: each part's
        qweight, qzeros, scales (and g_idx) are kept whole as they load, `finish_int4` packs them."""
        device = self.weight.device
        self.weight = None
        for name in INT4_TENSORS if g_idx else INT4_TENSORS[:3]:
            self.register_parameter(name, nn.Parameter(torch.empty(0, device=device), requires_grad=False))
        self.__dict__["_int4_parts"] = {}

    def load_int4(self, name: str, src: WeightSource, part: int | None) -> None:
        self.__dict__["_int4_parts"][(name, part)] = src.full().to(self._parameters[name].device)

    def _int4_columns(self) -> list[tuple[int | None, int, int]]:
        """(part, first column, columns) of each checkpoint part this rank keeps, in order."""
        return [(None, 0, self.out_features)]

    def _int4_rows(self) -> tuple[int, int]:
        """The checkpoint's input rows this rank keeps, of `_int4_full_in`."""
        return 0, self.in_features

    def _int4_full_in(self) -> int:
        return self.in_features

    def finish_int4(self, plan, dtype: torch.dtype) -> None:
        """The loaded parts -> `w4`: unpacked to 4-bit values [K, N], stacked along N, this rank's
        columns and input rows taken, packed in GPTQ's layout with float zeros (docstring of
        gpu_worker/int4.py)."""
        from gpu_worker.int4 import AWQ_ORDER, unpack_cols

        parts = self.__dict__.pop("_int4_parts")
        qs, zeros, scales, g_idx = [], [], [], None
        for part, start, size in self._int4_columns():
            if ("qweight", part) not in parts:
                raise ValueError(f"4-bit weights for only some of its stacked projections (part {part} missing)")
            qw, qz, sc = (parts[(n, part)] for n in INT4_TENSORS[:3])
            if plan.method == "awq":
                q, z = unpack_cols(qw, AWQ_ORDER), unpack_cols(qz, AWQ_ORDER)
            else:
                q, z = unpack_int4_rows(qw), unpack_cols(qz)
            if q.shape[1] < start + size or z.shape[1] != q.shape[1] or sc.shape != z.shape:
                raise ValueError(f"4-bit tensors of part {part} do not fit: qweight unpacks to {list(q.shape)}, "
                                 f"qzeros to {list(z.shape)}, scales {list(sc.shape)}")
            qs.append(q[:, start : start + size])
            zeros.append(z[:, start : start + size] + plan.zero_offset)
            scales.append(sc[:, start : start + size])
            if ("g_idx", part) in parts:
                gi = parts[("g_idx", part)].to(torch.int32)
                if g_idx is not None and not torch.equal(gi, g_idx):
                    raise ValueError("its stacked projections have different g_idx (act-order groups)")
                g_idx = gi
        q, z, sc = torch.cat(qs, 1), torch.cat(zeros, 1), torch.cat(scales, 1)
        rows_start, rows_stop = self._int4_rows()
        k_full, num_groups = q.shape[0], sc.shape[0]
        if q.shape[1] != self.out_features or k_full != self._int4_full_in():
            raise ValueError(f"4-bit weights unpack to {list(q.shape)}, expected [{self._int4_full_in()}, "
                             f"{self.out_features}] (this rank's columns)")
        group_size = plan.group_size if plan.group_size > 0 else k_full
        if g_idx is None:
            g_idx = torch.arange(k_full, dtype=torch.int32, device=q.device) // group_size
        if int(g_idx.max()) >= num_groups or g_idx.numel() != k_full:
            raise ValueError(f"g_idx of {g_idx.numel()} rows names groups past the {num_groups} of scales")
        q, g_idx = q[rows_start:rows_stop], g_idx[rows_start:rows_stop]
        plain = torch.arange(rows_start, rows_stop, dtype=torch.int32, device=q.device) // group_size
        if torch.equal(g_idx, plain) and rows_start % group_size == 0:  # keep only this rank's groups
            first = rows_start // group_size
            last = -(-rows_stop // group_size)
            z, sc = z[first:last], sc[first:last]
            g_idx = None
        self.w4 = Int4GroupWeight(pack_int4_rows(q), sc.to(dtype).contiguous(), z.to(dtype).contiguous(), g_idx)
        for name in INT4_TENSORS:
            self._parameters.pop(name, None)

    def quantize_int4(self, group_size: int) -> None:
        """Dummy weights under `--quantization gptq|awq`: round to nearest, symmetric, in groups
        of `group_size` input rows (one group where they do not divide the rows)."""
        group = group_size if self.in_features % group_size == 0 else -1
        self.w4 = Int4GroupWeight.quantize(self.weight.data, group, sym=True)
        self.weight = None

    def load_quantized(self, name: str, src: GGUFQuantized, part: int | None) -> None:
        """A quantized checkpoint matrix: this layer's whole weight, or projection `part` of a
        stacked one; packed for the 4-bit kernel once every part is in."""
        sizes = getattr(self, "full_sizes", [self.out_features])
        if name != "weight" or tp().size != 1:
            raise ValueError(f"quantized {name} is only read whole, by one rank")
        rows = sizes[part or 0]
        if tuple(src.shape) != (rows, self.in_features):
            raise ValueError(f"has shape {tuple(src.shape)}, expected {(rows, self.in_features)} (for {name})")
        pending = self.__dict__.setdefault("_int4_parts", {})
        pending[part or 0] = src.int4_parts()
        if len(pending) == len(sizes):
            self.int4 = Int4Weight(Int4Parts.cat_rows([pending[i] for i in range(len(sizes))]))
            self.weight = None
            del self.__dict__["_int4_parts"]


class MergedLinear(Linear):
    """Column-parallel: one matmul for one or several projections of the same input (q/k/v,
    gate/up), stacked by rows, each rank holding its slice of every projection's rows.

    `output_sizes` are the full projections' row counts, in order. `shards` says which rows of
    each this rank keeps, (start, size) per projection; by default the rank's equal part.
    The output stays split: the next layer (attention, the activation, a row-parallel
    projection) works on this rank's part.
    """

    def __init__(
        self, in_features: int, output_sizes: list[int], bias: bool, shards: list[tuple[int, int]] | None = None
    ) -> None:
        rank = tp().rank
        if shards is None:
            shards = [(rank * n, n) for n in (shard(n, "a projection's output size") for n in output_sizes)]
        super().__init__(in_features, sum(size for _, size in shards), bias=bias)
        self.full_sizes = output_sizes
        self.shards = shards
        self.output_sizes = [size for _, size in shards]  # this rank's rows of each projection

    def _int4_columns(self) -> list[tuple[int | None, int, int]]:
        return [(i, start, size) for i, (start, size) in enumerate(self.shards)]

    def load_param(self, name: str, src: WeightSource, part: int | None) -> None:
        """Checkpoint rows -> this rank's rows: of projection `part`, or of each projection
        when the checkpoint holds them stacked in one tensor (part None; GPT-2's c_attn)."""
        if name in INT4_TENSORS:
            if part is None:
                raise ValueError("4-bit weights stacked in one tensor are not supported")
            return self.load_int4(name, src, part)
        if name in FP8_SCALES:
            parts = range(len(self.shards)) if part is None else [part]
            starts = [sum(self.full_sizes[:i]) if part is None else 0 for i in range(len(self.shards))]
            ours = [sum(self.output_sizes[:i]) for i in range(len(self.shards))]
            blocks = [(ours[i], starts[i] + self.shards[i][0], self.shards[i][1], i) for i in parts]
            rows = sum(self.full_sizes) if part is None else self.full_sizes[part]
            return self._load_fp8_scale(name, src, rows, blocks)
        param = getattr(self, name)
        dest = param.data.split(self.output_sizes, dim=0)
        rows = sum(self.full_sizes) if part is None else self.full_sizes[part]
        check_shape(src, (rows, *param.shape[1:]), name)
        offset = 0
        for i, (start, size) in enumerate(self.shards):
            if part is None or i == part:
                base = offset if part is None else 0
                dest[i].copy_(src.rows(base + start, base + start + size))
            offset += self.full_sizes[i]


class HeadSplit:
    """Which attention heads a rank keeps: an equal part of the query heads, and of the KV
    heads, or, with fewer KV heads than ranks, the one KV head its query heads read (each
    KV head then held by tp / kv_heads ranks, vLLM's replication)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        rank, size = tp().rank, tp().size
        self.num_heads = shard(num_heads, "the number of attention heads")
        if num_kv_heads >= size:
            self.num_kv_heads = shard(num_kv_heads, "the number of KV heads")
            kv_start = rank * self.num_kv_heads
        else:
            if size % num_kv_heads:
                raise ValueError(f"tensor_parallel_size {size} is not a multiple of the {num_kv_heads} KV heads")
            self.num_kv_heads = 1
            kv_start = rank * num_kv_heads // size
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.full_sizes = [q_size, kv_size, kv_size]
        kv = (kv_start * head_dim, self.num_kv_heads * head_dim)
        self.shards = [(rank * self.num_heads * head_dim, self.num_heads * head_dim), kv, kv]


class RowParallelLinear(Linear):
    """Row-parallel: each rank holds a slice of the input columns, multiplies its part of a
    column-parallel output, and the partial sums are added by an all-reduce (the bias once)."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(shard(in_features, "a projection's input size"), out_features, bias=bias)

    def load_param(self, name: str, src: WeightSource, part: int | None) -> None:
        if name in INT4_TENSORS:
            return self.load_int4(name, src, part)
        if name in FP8_SCALES:  # every output row is this rank's
            return self._load_fp8_scale(name, src, self.out_features, [(0, 0, self.out_features, 0)])
        if name == "bias":
            check_shape(src, (self.out_features,), name)
            self.bias.data.copy_(src.full())
            return
        check_shape(src, (self.out_features, self.in_features * tp().size), name)
        start = tp().rank * self.in_features
        self.weight.data.copy_(src.cols(start, start + self.in_features))

    def _int4_rows(self) -> tuple[int, int]:
        return tp().rank * self.in_features, (tp().rank + 1) * self.in_features

    def _int4_full_in(self) -> int:
        return self.in_features * tp().size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self._matmul(x, self.bias if tp().rank == 0 else None))


# A quantized LM head's logits recomputed in fp32 per row (VocabParallelEmbedding.logits).
RESCORED = 32


class VocabParallelEmbedding(nn.Module):
    """The token embedding, each rank holding a slice of the vocabulary's rows (the last slice
    padded with zero rows); a token outside the slice embeds to zeros, and an all-reduce
    gives every rank the whole embedding. Its weight doubles as a tied LM head's.

    A GGUF's quantized matrix (on the CPU, one rank) stays in its blocks (`quantized`, a view
    of the mapped file): a lookup dequantizes the rows it reads, and `logits` goes through an
    int8 kernel, its weights made at load for the model's output layer (`prepare_logits`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.rows = -(-num_embeddings // tp().size)  # ceil
        self.start = tp().rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, embedding_dim))
        self.quantized: GGUFQuantized | None = None
        self.dtype = torch.get_default_dtype()  # set from the weight when `quantized` replaces it
        self.int8: Int8RowWeight | None = None  # the LM head's matmul, when quantized
        self.fp8: Fp8Weight | None = None  # an untied LM head under --fp8-lm-head (then weight is None)

    def load_quantized(self, name: str, src: GGUFQuantized, part: int | None) -> None:
        if tp().size != 1:
            raise ValueError(f"quantized {name} is only read whole, by one rank")
        check_shape(src, (self.num_embeddings, self.weight.shape[1]), name)
        self.dtype = self.weight.dtype  # the model's: the dequantized rows a lookup returns
        self.quantized, self.weight = src, None

    def prepare_logits(self) -> None:
        if self.quantized is not None and self.int8 is None:
            self.int8 = Int8RowWeight(self.quantized.dequantize())

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> this rank's logits [N, rows] (the LM head's matmul).

        Quantized, the logits come from a per-row int8 copy of the matrix (bf16 out, which
        rounds logits near 25 to multiples of 1/8: enough to swap two near-tied tokens). So the
        RESCORED best of each row are computed again in fp32 from the checkpoint's own blocks:
        the argmax and the likeliest tokens' logits are then exact whenever the true best token
        is among the RESCORED best approximate ones (its approximate logit is off by a few
        hundredths; the RESCORED-th is typically several units below the best)."""
        if self.fp8 is not None:
            return self.fp8(hidden)
        if self.quantized is None:
            return linear(hidden, self.weight)
        self.prepare_logits()
        assert self.int8 is not None
        logits = self.int8(hidden)
        top = topk_indices(logits, min(RESCORED, logits.shape[-1]))
        for start in range(0, len(hidden), 64):  # bounded memory for long prompt-logprob runs
            ids = top[start : start + 64]
            rows = self.quantized.take_rows(ids.cpu()).to(hidden.device, hidden.dtype)  # [n, R, hidden]
            exact = torch.matmul(rows, hidden[start : start + 64, :, None]).squeeze(-1)
            logits[start : start + 64].scatter_(1, ids, exact.to(logits.dtype))
        return logits

    def load_param(self, name: str, src: WeightSource, part: int | None) -> None:
        check_shape(src, (self.num_embeddings, self.weight.shape[1]), name)
        stop = min(self.start + self.rows, self.num_embeddings)
        self.weight.data[max(0, stop - self.start) :].zero_()
        if stop > self.start:
            self.weight.data[: stop - self.start].copy_(src.rows(self.start, stop))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return self.quantized.take_rows(input_ids.cpu()).to(input_ids.device, self.dtype)
        if tp().size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.rows)
        out = F.embedding(torch.where(inside, local, 0), self.weight)
        return all_reduce(out * inside.unsqueeze(-1).to(out.dtype))


class ParallelLMHead(VocabParallelEmbedding):
    """An untied LM head: [vocab, hidden] split by vocabulary rows like the embedding; the
    model's `compute_logits` gathers the ranks' logits."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__(vocab_size, hidden_size)

    def quantize_fp8(self) -> None:
        """`--fp8-lm-head`: this rank's rows to e4m3 with a scale per row (its zero padding rows
        get the smallest scale and stay zero); the 16/32-bit weight is dropped. Never looked up:
        only the embedding, a separate matrix here, is."""
        self.fp8 = Fp8Weight.quantize(self.weight.data)
        self.weight = None


def check_shape(src: WeightSource | GGUFQuantized, expected: tuple[int, ...], name: str) -> None:
    """ValueError unless the checkpoint tensor (whole, before slicing) has the expected shape."""
    if tuple(src.shape) != tuple(expected):
        raise ValueError(f"has shape {tuple(src.shape)}, expected {tuple(expected)} (for {name})")


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
