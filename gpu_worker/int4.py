"""4-bit weights of GPTQ and AWQ checkpoints, run as W4A16 (kernels/int4_linear.py).

A checkpoint whose config.json has a `quantization_config` of quant_method "gptq" (bits 4) or
"awq" (w_bit / bits 4, version "gemm") loads its decoder linears as stored, without
dequantizing: per projection `qweight` (int32, eight 4-bit values each), `qzeros` (the zero
points, packed alike), `scales` (fp16, one per group of input rows and output column) and, for
GPTQ, `g_idx` (the group of each input row: act-order / desc_act permutes them). The layouts:
- GPTQ: qweight [K / 8, N], packed along K: input row 8i + j in bits 4j..4j+3 of row i.
  qzeros [G, N / 8], packed along N: column 8c + j in bits 4j of column c; checkpoint_format
  "gptq" (v1, AutoGPTQ's) stores each zero minus one (its packing quirk), "gptq_v2" as is.
- AWQ (AutoAWQ's GEMM layout): qweight [K, N / 8] and qzeros [G, N / 8], both packed along N
  in the order AWQ_ORDER; no g_idx (group of row k: k // group_size).
Every projection is unpacked to 4-bit values [K, N] on the device, its parts stacked along N
(q/k/v, gate/up: their inputs are the same, so GPTQ's act-order groups are too, checked),
this rank's slice taken (columns for column-parallel layers, input rows for row-parallel ones)
and repacked into one layout, GPTQ's, for the kernel: qweight [K / 8, N], scales and zeros
[G, N] in the model's dtype, g_idx only where it is not the plain k // group_size.
W[k, n] = (q[k, n] - zero[g(k), n]) * scale[g(k), n].

`--quantization gptq` / `awq` may be given (vLLM's names) or left unset; any other value with
such a checkpoint fails the load naming it, as does a checkpoint whose bits are not 4, a
quantized layer Pagoda keeps unquantized, or a stacked layer with only some parts quantized.
`--load-format dummy --quantization gptq` (benchmarks) quantizes the random weights at load,
round to nearest, symmetric, groups of 128 (`Int4GroupWeight.quantize`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from gpu_worker.checkpoint import Checkpoint
from gpu_worker.layers import INT4_TENSORS, Linear, MergedLinear, RowParallelLinear

logger = logging.getLogger(__name__)

INT4_METHODS = ("gptq", "awq")
# Nibble i of an AWQ int32 holds column 8c + AWQ_ORDER[i] (AutoAWQ's GEMM packing).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
DUMMY_GROUP_SIZE = 128


@dataclass(frozen=True)
class Int4Plan:
    """How this load makes 4-bit linears: read from a checkpoint of `method` ("gptq", "awq"), or
    quantized at load from dummy weights ("rtn")."""

    method: str
    group_size: int  # -1: one group over all input rows
    zero_offset: int = 0  # added to each stored zero (GPTQ v1 stores zero - 1)


def checkpoint_int4_plan(hf_config: dict) -> Int4Plan | None:
    """The plan of config.json's GPTQ / AWQ quantization_config; None without one of those.
    ValueError for one Pagoda does not run, naming what."""
    qc = hf_config.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method not in INT4_METHODS:
        return None
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise ValueError(f"quantization_config quant_method {method!r} with bits {bits} is not supported (4 bits)")
    group_size = int(qc.get("group_size", qc.get("q_group_size", -1)) or -1)
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"quantization_config quant_method 'awq' version {version!r} is not supported (gemm)")
        if not qc.get("zero_point", True):
            raise ValueError("quantization_config quant_method 'awq' without zero_point is not supported")
        return Int4Plan("awq", group_size)
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"quantization_config quant_method 'gptq' checkpoint_format {fmt!r} is not supported "
                         "(gptq, gptq_v2)")
    return Int4Plan("gptq", group_size, zero_offset=1 if fmt == "gptq" else 0)


def unpack_cols(packed: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """int32 [R, C] packed along columns (nibble i of column c: column 8c + order[i]) -> int32
    [R, 8C] of 0..15."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    nibbles = (packed.to(torch.int32)[:, :, None] >> shifts) & 0xF  # [R, C, 8]: nibble i
    out = torch.empty_like(nibbles)
    out[:, :, list(order)] = nibbles  # column 8c + order[i] <- nibble i
    return out.reshape(packed.shape[0], -1)


def prepare_checkpoint(model: nn.Module, checkpoint: Checkpoint) -> int:
    """Make each linear whose checkpoint tensors are 4-bit take them (`Linear.expect_int4`). The
    number of such linears. ValueError: a quantized layer Pagoda keeps unquantized."""
    stored = checkpoint.stored_dtypes
    if stored is None:
        raise ValueError("GPTQ / AWQ checkpoints are read from safetensors files")
    modules = dict(model.named_modules())
    layers: dict[str, bool] = {}  # our module -> has g_idx
    parts: dict[str, set[int | None]] = {}  # our module -> the parts that have a qweight
    for name in stored:
        tensor = name.rpartition(".")[2]
        if tensor not in INT4_TENSORS:
            continue
        module_name, part = model._our_module(name, modules)
        layer = modules.get(module_name)
        if not isinstance(layer, (MergedLinear, RowParallelLinear)):
            raise ValueError(f"weight {name}: 4-bit for a layer Pagoda keeps unquantized (or does not have)")
        layers[module_name] = layers.get(module_name, False) or tensor == "g_idx"
        if tensor == "qweight":
            parts.setdefault(module_name, set()).add(part)
    if not layers:
        raise ValueError("config.json declares GPTQ / AWQ weights but no tensor is a qweight")
    for module_name in layers:
        layer = modules[module_name]
        expected = set(range(len(layer.output_sizes))) if isinstance(layer, MergedLinear) else {None}
        if parts.get(module_name, set()) != expected:
            raise ValueError(f"{module_name}: only some of its stacked projections are 4-bit (GPTQ / AWQ)")
    for module_name, g_idx in layers.items():
        modules[module_name].expect_int4(g_idx)
    return len(layers)


@torch.no_grad()
def finish(model: nn.Module, plan: Int4Plan, dtype: torch.dtype) -> int:
    """After the weights are in: pack each 4-bit linear's parts for the kernel, or (dummy weights,
    plan "rtn") quantize every decoder linear. The number of 4-bit linears."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    for layer in linears:
        if "qweight" in layer._parameters:
            layer.finish_int4(plan, dtype)
        elif plan.method == "rtn" and layer.fp8 is None and layer.int4 is None and layer.w4 is None:
            layer.quantize_int4(DUMMY_GROUP_SIZE)
    done = [m for m in linears if m.w4 is not None]
    if done and done[0].w4.qweight.is_cuda:
        torch.cuda.empty_cache()
    return len(done)
