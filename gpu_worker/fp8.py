"""FP8 weights (W8A8, kernels/fp8_linear.py) for a model's linear layers, as vLLM makes them.

Two ways in:
- `--quantization fp8` on a 16/32-bit checkpoint (or GGUF, dequantized): once every weight is
  loaded, each `Linear` of the decoder layers (q/k/v, o, gate/up, down; not the embedding or
  the LM head, which vLLM keeps too) quantizes the part its rank holds to e4m3 with a scale per
  output row and drops the 16/32-bit weight. A row's scale only depends on that row, so a
  column-parallel rank's rows get the scales the whole matrix would give them; a row-parallel
  rank quantizes its own input columns (its rows are shorter, its scales its own).
- An FP8 checkpoint, read as it is (no dequantization): config.json's `quantization_config`
  of quant_method "compressed-tensors" (weights num_bits 8, type float, strategy channel or
  tensor; activations dynamic per token or static per tensor), "fbgemm_fp8" (scales per row,
  dynamic per-token activations under `activation_scale_ub`; `modules_to_not_convert`) or
  "fp8" (vLLM's and AutoFP8's per-tensor layout, not block-wise). Which layers are FP8 is read
  from the tensors: a layer whose checkpoint has a `weight_scale` (its `weight` then stored
  float8_e4m3fn) takes `weight`, `weight_scale` and, if present, `input_scale` (static
  activations) directly; the others (ignore lists, modules_to_not_convert) load as usual. So
  `--quantization` unset means fp8 for such a checkpoint; "none" and "gguf" are refused.
  Projections stacked into one layer (q/k/v, gate/up) put each part's scales on its rows (a
  per-tensor scale spread over them: exact); their static input scales become one, the largest.
  The checkpoint's KV-cache scales (`k_scale`, `v_scale`, ...) are skipped.

Any other quantization_config fails the load with a line naming its quant_method.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from gpu_worker.checkpoint import Checkpoint
from gpu_worker.layers import FP8_SCALES, Linear, MergedLinear, ParallelLMHead
from kernels.fp8_linear import scaled_mm_supported

logger = logging.getLogger(__name__)

FP8_METHODS = ("compressed-tensors", "fbgemm_fp8", "fp8")
# Tensors of FP8 checkpoints that are not read: attention's quantized-KV-cache scales
# (compressed-tensors' kv_cache_scheme, vLLM's fp8; the KV cache keeps its own dtype and scales)
# and a per-layer copy of fbgemm's activation_scale_ub (config.json's is used).
SKIPPED_SUFFIXES = (".k_scale", ".v_scale", ".q_scale", ".prob_scale", ".k_proj.output_scale",
                    ".v_proj.output_scale", ".input_scale_ub")
STORED_FP8 = "F8_E4M3"


@dataclass(frozen=True)
class Fp8Plan:
    """How this load makes FP8 linears: from a 16/32-bit checkpoint (`quantize`) or read as
    stored from an FP8 checkpoint of `method`."""

    quantize: bool
    method: str | None = None  # the checkpoint's quant_method
    input_scale_ub: float | None = None  # fbgemm_fp8's activation_scale_ub


def plan_fp8(quantization: str | None, hf_config: dict) -> Fp8Plan | None:
    """The FP8 plan of a load, or None for none. ValueError: a quantization_config Pagoda does
    not read, or a --quantization that contradicts the checkpoint's."""
    method, ub = checkpoint_fp8_method(hf_config)
    if method is None:
        return Fp8Plan(quantize=True) if quantization == "fp8" else None
    if quantization not in (None, "gguf", "fp8"):
        raise ValueError(f"the checkpoint is FP8 ({method}); --quantization {quantization} is not supported for it "
                         "(leave it unset or give fp8)")
    return Fp8Plan(quantize=False, method=method, input_scale_ub=ub)


def checkpoint_fp8_method(hf_config: dict) -> tuple[str | None, float | None]:
    """(quant_method, fbgemm's activation_scale_ub) of config.json's FP8 quantization_config;
    (None, None) without one. ValueError for one Pagoda does not read, naming what."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None, None
    method = qc.get("quant_method")
    supported = f"supported: FP8 checkpoints of {', '.join(FP8_METHODS)}; 4-bit ones of gptq, awq"
    if method == "compressed-tensors":
        _check_compressed_tensors(qc)
        return method, None
    if method == "fbgemm_fp8":
        ub = qc.get("activation_scale_ub")
        return method, float(ub) if ub is not None else None
    if method == "fp8":
        if qc.get("weight_block_size"):
            raise ValueError(f"quantization_config quant_method 'fp8' with weight_block_size "
                             f"{qc['weight_block_size']} (block-wise FP8) is not supported ({supported}: per "
                             "tensor or per channel)")
        if qc.get("activation_scheme", "dynamic") not in ("dynamic", "static"):
            raise ValueError(f"quantization_config quant_method 'fp8': activation_scheme "
                             f"{qc.get('activation_scheme')!r} is not supported (dynamic, static)")
        return method, None
    raise ValueError(f"quantization_config quant_method {method!r} is not supported ({supported})")


def _check_compressed_tensors(qc: dict) -> None:
    """Every config group is FP8 W8A8 (or W8A16, run as W8A8 with per-token activations)."""
    where = "quantization_config (compressed-tensors)"
    fmt = qc.get("format")
    if fmt not in (None, "float-quantized", "naive-quantized"):
        raise ValueError(f"{where}: format {fmt!r} is not supported (supported: float-quantized, naive-quantized)")
    sparsity = qc.get("sparsity_config") or {}
    if sparsity.get("format") not in (None, "dense"):
        raise ValueError(f"{where}: sparsity format {sparsity.get('format')!r} is not supported")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise ValueError(f"{where} has no config_groups")
    for group_name, group in groups.items():
        w = group.get("weights") or {}
        if not (w.get("num_bits") == 8 and w.get("type") == "float" and w.get("strategy") in ("channel", "tensor")
                and w.get("symmetric", True) and not w.get("dynamic", False)):
            raise ValueError(
                f"{where}: {group_name}'s weights (num_bits {w.get('num_bits')}, type {w.get('type')}, strategy "
                f"{w.get('strategy')}) are not supported (supported: FP8, num_bits 8, type float, strategy channel "
                "or tensor, symmetric, static)")
        a = group.get("input_activations")
        if a is not None:
            dynamic_token = a.get("dynamic") is True and a.get("strategy") == "token"
            static_tensor = not a.get("dynamic") and a.get("strategy") == "tensor" and a.get("symmetric", True)
            if a.get("num_bits") != 8 or a.get("type") != "float" or not (dynamic_token or static_tensor):
                raise ValueError(
                    f"{where}: {group_name}'s input_activations (num_bits {a.get('num_bits')}, type {a.get('type')}, "
                    f"strategy {a.get('strategy')}, dynamic {a.get('dynamic')}) are not supported (supported: FP8 "
                    "dynamic per token or static per tensor)")
        if group.get("output_activations"):
            raise ValueError(f"{where}: {group_name}'s output_activations are not supported")


def fp8_linears(module: nn.Module) -> list[Linear]:
    return [m for m in module.modules() if isinstance(m, Linear) and m.fp8 is not None]


def prepare_checkpoint(
    model: nn.Module, checkpoint: Checkpoint, tensors: Iterable[tuple[str, object]]
) -> Iterator[tuple[str, object]]:
    """Make the checkpoint's FP8 layers take its e4m3 weights and scales (`Linear.expect_fp8`)
    and return the tensors to load (the KV-cache scales left out). ValueError: a layer Pagoda
    keeps unquantized, or a stacked layer whose parts are not all FP8 alike."""
    stored = checkpoint.stored_dtypes
    if stored is None:
        raise ValueError("FP8 checkpoints are read from safetensors files")
    modules = dict(model.named_modules())
    parts: dict[str, dict[str, set[int | None]]] = {}  # our module -> scale name -> its parts
    for name in stored:
        scale = next((s for s in FP8_SCALES if name.endswith("." + s)), None)
        if scale is None or name.endswith(SKIPPED_SUFFIXES):
            continue
        module_name, part = model._our_module(name, modules)
        layer = modules.get(module_name)
        if not isinstance(layer, Linear):
            raise ValueError(f"weight {name}: FP8 for a layer Pagoda keeps unquantized (or does not have)")
        if scale == "weight_scale":
            weight = name.removesuffix("_scale")
            if stored.get(weight) != STORED_FP8:
                raise ValueError(f"weight {weight} is stored {stored.get(weight)}, not {STORED_FP8}, beside its "
                                 "weight_scale")
        parts.setdefault(module_name, {}).setdefault(scale, set()).add(part)
    for module_name, scales in parts.items():
        layer = modules[module_name]
        expected = set(range(len(layer.output_sizes))) if isinstance(layer, MergedLinear) else {None}
        for scale, got in scales.items():
            if None not in got and got != expected:  # (part None: one tensor holds every part)
                what = "FP8 (a weight_scale)" if scale == "weight_scale" else "a static input_scale"
                raise ValueError(f"{module_name}: only some of its stacked projections have {what}")
        if "weight_scale" not in scales:
            raise ValueError(f"{module_name}: an input_scale without a weight_scale")
        layer.expect_fp8(static_input="input_scale" in scales)
    if not parts:
        raise ValueError("config.json declares FP8 weights but no tensor has a weight_scale")
    skipped = [name for name in stored if name.endswith(SKIPPED_SUFFIXES)]
    if skipped:
        logger.info("FP8 checkpoint: %d tensors not used (KV-cache scales, ...: %s)", len(skipped), skipped[0])
    return ((name, t) for name, t in tensors if not name.endswith(SKIPPED_SUFFIXES))


@torch.no_grad()
def finish(model: nn.Module, plan: Fp8Plan, lm_head: bool = False) -> int:
    """After the weights are in: pack an FP8 checkpoint's tensors, or quantize every decoder
    linear (`plan.quantize`); `lm_head` (`--fp8-lm-head`): quantize an untied LM head as well
    (a tied one is the embedding's matrix and stays as it is). The number of FP8 linears (the
    LM head not counted)."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    for layer in linears:
        if "weight_scale" in layer._parameters:
            layer.finish_fp8(plan.input_scale_ub)
        elif plan.quantize and layer.fp8 is None and layer.int4 is None:
            layer.quantize_fp8()
    if lm_head:
        head = model.output_layer()
        if isinstance(head, ParallelLMHead) and head.quantized is None:
            head.quantize_fp8()
            logger.info("FP8: the LM head in FP8 too (%d x %d)", *head.fp8.weight.shape)
        else:
            logger.warning("fp8_lm_head: the LM head is tied to the embedding (or kept quantized): left as it is")
    done = fp8_linears(model)
    odd = [m for m in done if not scaled_mm_supported(m.fp8.in_features, m.fp8.out_features)]
    device = done[0].fp8.weight.device if done else torch.device("cpu")
    if odd and device.type == "cuda":
        logger.warning("FP8: %d of %d linears have a size that is not a multiple of 16 (e.g. %d x %d), which "
                       "torch._scaled_mm does not take: they run the slow reference", len(odd), len(done),
                       odd[0].fp8.out_features, odd[0].fp8.in_features)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the 16-bit weights' memory back, before the KV cache is sized
    return len(done)
