"""FP8 linears (kernels/fp8_linear.py): the quantization's bounds, the W8A8 reference matmul
against fp64 on the dequantized operands, the `_scaled_mm` call's conventions, the Triton
quantization kernel and the skinny W8A16 kernel for decode-sized inputs (in Triton's
interpreter and compiled for sm_90 here; on the GPU with `-m gpu`, with `_scaled_mm` and the
W8A16 kernel at llama3-8b's projection shapes)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kernels.fp8_linear as fp8_module
from kernels.fp8_linear import (
    FP8_DTYPE,
    FP8_MAX,
    MIN_SCALE,
    Fp8Weight,
    dequantize,
    fp8_linear,
    fp8_linear_ref,
    quantize_rows_ref,
    scaled_mm_rowwise,
    use_skinny_w8a16,
    w8a16_linear_ref,
)

ROOT = Path(__file__).resolve().parents[2]
# e4m3: 3 mantissa bits, so rounding errs by at most 2^-4 of a normal value; below 2^-6 (the
# smallest normal) values are subnormal, spaced 2^-9 apart.
HALF_ULP = 2.0**-4
SUBNORMAL_HALF_STEP = 2.0**-10
DTYPE_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get
LLAMA3_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def rows_with_outliers(m: int, k: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 1, m)[:, None]  # rows of very different sizes
    x[:, :: max(1, k // 7)] *= 20  # a few outliers per row
    return x.to(dtype)


# ---- quantization ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_ID)
def test_per_token_quantization_round_trips_within_half_an_e4m3_step(dtype) -> None:
    x = rows_with_outliers(9, 300, dtype)
    x[4] = 0  # an all-zero row: the floor scale, zeros out
    q, scale = quantize_rows_ref(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape and scale.shape == (9, 1) and scale.dtype == torch.float32
    xf = x.float()
    assert torch.equal(scale[:, 0], (xf.abs().amax(1) / FP8_MAX).clamp_min(MIN_SCALE))
    assert scale[4].item() == torch.tensor(MIN_SCALE).item() and not bits(q[4]).any()
    back = dequantize(q, scale)
    err = (back - xf).abs()
    assert bool((err <= torch.maximum(HALF_ULP * xf.abs(), SUBNORMAL_HALF_STEP * scale)).all())
    # Each row's largest |value| becomes +-448 exactly.
    assert bool((q.float().abs().amax(1)[[0, 1, 2, 3, 5, 6, 7, 8]] == FP8_MAX).all())


def test_static_scale_clamps_and_the_scale_bound_clips() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5], [1000.0, -3.0, 0.0]])
    q, scale = quantize_rows_ref(x, static_scale=torch.tensor(0.01))
    assert torch.equal(scale, torch.full((2, 1), 0.01))
    assert q.float().tolist() == [[96.0, -192.0, 48.0], [448.0, -288.0, 0.0]]  # 1000 / 0.01 clamps to 448
    q, scale = quantize_rows_ref(x, scale_ub=448.0)  # amax bounded by 448: scale at most 1
    assert torch.equal(scale[:, 0], torch.tensor([2.0 / 448, 1.0]))
    assert q[1].float().tolist() == [448.0, -3.0, 0.0]


def test_weight_quantization_has_a_scale_per_output_row() -> None:
    w = rows_with_outliers(24, 64)
    fp8 = Fp8Weight.quantize(w)
    assert fp8.weight.dtype == FP8_DTYPE and fp8.scale.shape == (1, 24) and fp8.input_scale is None
    assert torch.equal(fp8.scale[0], w.abs().amax(1) / FP8_MAX)
    assert bool(((fp8.dequantize() - w).abs() <= torch.maximum(HALF_ULP * w.abs(), fp8.scale.t() / 1024)).all())
    assert fp8.nbytes == 24 * 64 + 4 * 24
    with pytest.raises(ValueError, match="float8_e4m3fn matrix, not torch.float32"):
        Fp8Weight(w, fp8.scale)
    with pytest.raises(ValueError, match="needs as many scales, not 23"):
        Fp8Weight(fp8.weight, fp8.scale[:, 1:])


# ---- the matmul ----------------------------------------------------------------------------------


@pytest.mark.parametrize("static", [False, True])
def test_reference_is_the_exact_product_of_the_dequantized_operands(static) -> None:
    x = rows_with_outliers(7, 96, seed=1).reshape(7, 1, 96)  # leading dims kept
    w = Fp8Weight.quantize(rows_with_outliers(40, 96, seed=2))
    bias = torch.randn(40)
    input_scale = torch.tensor(0.05) if static else None
    y = fp8_linear_ref(x, w.weight, w.scale, bias, input_scale)
    assert y.shape == (7, 1, 40) and y.dtype == torch.float32
    q, s = quantize_rows_ref(x.reshape(7, 96), input_scale)
    exact = dequantize(q, s).double() @ w.dequantize().double().t() + bias.double()
    assert torch.allclose(y.reshape(7, 40).double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
    # bf16 activations: the same product, rounded once to bf16 (within one bf16 step).
    yb = fp8_linear_ref(x.reshape(7, 96).bfloat16(), w.weight, w.scale, bias.bfloat16(), input_scale)
    q, s = quantize_rows_ref(x.reshape(7, 96).bfloat16(), input_scale)
    exact = dequantize(q, s).double() @ w.dequantize().double().t() + bias.bfloat16().double()
    assert yb.dtype == torch.bfloat16
    assert bool(((yb.double() - exact).abs() <= 2.0**-8 * exact.abs() + 1e-30).all())


def test_fp8_weight_on_the_cpu_runs_the_reference() -> None:
    x = torch.randn(3, 5, 64)
    w = Fp8Weight.quantize(torch.randn(48, 64), )
    w.input_scale_ub = 1.5
    assert torch.equal(w(x), fp8_linear_ref(x, w.weight, w.scale, None, None, 1.5))
    assert torch.equal(fp8_linear(x, w.weight, w.scale), fp8_linear_ref(x, w.weight, w.scale))


def _cpu_scaled_mm_rowwise() -> bool:
    try:
        a = torch.zeros(2, 16, dtype=FP8_DTYPE)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(2, 1), scale_b=torch.ones(1, 2), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(not _cpu_scaled_mm_rowwise(), reason="this torch has no row-wise _scaled_mm on the CPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DTYPE_ID)
def test_scaled_mm_call_matches_the_reference_where_torch_runs_it_on_the_cpu(dtype) -> None:
    """The GPU path's call (operand layout, scale shapes, bf16 product, bias fused or added) on
    torch's CPU implementation of _scaled_mm (recent torch has one)."""
    x = rows_with_outliers(5, 64, dtype, seed=3)
    w = Fp8Weight.quantize(torch.randn(32, 64))
    bias = torch.randn(32).to(dtype)
    q, s = quantize_rows_ref(x)
    y = scaled_mm_rowwise(q, s, w.weight, w.scale, bias, dtype)
    ref = fp8_linear_ref(x, w.weight, w.scale, bias)
    assert y.dtype == dtype
    # The product is rounded to bf16 (the bias fused, for bf16), then cast and the bias added.
    bound = 2.0**-8 * (ref.float().abs() + bias.float().abs()) + 1e-6 * ref.float().abs().max()
    assert bool(((y.float() - ref.float()).abs() <= bound).all())


def test_w8a16_reference_is_the_product_of_x_and_the_dequantized_weight() -> None:
    x = rows_with_outliers(5, 96, seed=4).reshape(5, 1, 96)
    w = Fp8Weight.quantize(rows_with_outliers(40, 96, seed=5))
    bias = torch.randn(40)
    y = w8a16_linear_ref(x, w.weight, w.scale, bias)
    assert y.shape == (5, 1, 40) and y.dtype == torch.float32
    exact = x.reshape(5, 96).double() @ w.dequantize().double().t() + bias.double()
    assert torch.allclose(y.reshape(5, 40).double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
    yb = w8a16_linear_ref(x.bfloat16(), w.weight, w.scale.reshape(-1), bias.bfloat16())  # [N] scales too
    exact = x.reshape(5, 96).bfloat16().double() @ w.dequantize().double().t() + bias.bfloat16().double()
    assert yb.dtype == torch.bfloat16
    assert bool(((yb.reshape(5, 40).double() - exact).abs() <= 2.0**-8 * exact.abs() + 1e-30).all())


def test_w8a16_dispatch_rule(monkeypatch) -> None:
    """CUDA (Triton kernels on), bf16/fp16, at most 16 rows, PAGODA_SKINNY_LINEAR not "0"."""
    assert not use_skinny_w8a16(torch.randn(1, 64, dtype=torch.bfloat16))  # the CPU: the W8A8 reference
    monkeypatch.setattr(fp8_module, "_use_triton", lambda x: True)  # as if on CUDA
    for shape, dtype, expected in (((1, 64), torch.bfloat16, True), ((16, 64), torch.float16, True),
                                   ((4, 4, 64), torch.bfloat16, True), ((17, 64), torch.bfloat16, False),
                                   ((2, 9, 64), torch.bfloat16, False), ((1, 64), torch.float32, False)):
        assert use_skinny_w8a16(torch.zeros(shape, dtype=dtype)) == expected, (shape, dtype)
    monkeypatch.setattr(fp8_module, "_SKINNY_LINEAR", "0")
    assert not use_skinny_w8a16(torch.zeros(1, 64, dtype=torch.bfloat16))


# ---- the Triton kernel, here -----------------------------------------------------------------------

INTERPRETED = textwrap.dedent("""
    import torch
    from kernels.fp8_linear import FP8_MAX, quantize_rows_ref
    from kernels.triton_fp8_linear import quantize_rows_triton
    torch.manual_seed(0)
    for m, k in [(1, 64), (3, 100), (4, 5000)]:
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(m, k) * torch.logspace(-2, 1, m)[:, None]).to(dtype)
            x[-1, :9] = 0
            for kw in ({}, {"scale_ub": 2.0}, {"static_scale": torch.tensor(0.01)}):
                # The values before the cast: Triton 3.9's interpreter casts to e4m3 wrongly (ties
                # away from zero, subnormals, a lost carry at powers of two); compiled, the cast
                # is cvt.rn.satfinite (the sm_90 test checks), bitwise equal on the GPU.
                v, s = quantize_rows_triton(x, **kw, out_dtype=torch.float32)
                _, sr = quantize_rows_ref(x, **kw)
                assert torch.equal(s, sr), (m, k, dtype, kw)
                assert torch.equal(v, (x.float() / sr).clamp(-FP8_MAX, FP8_MAX)), (m, k, dtype, kw)
    print("ok")
""")


def test_triton_kernel_in_the_interpreter_equals_the_reference() -> None:
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


COMPILED = textwrap.dedent("""
    import sys
    sys.path.insert(0, "scripts")
    from kernel_resources import compile_kernel, report
    from kernels import triton_fp8_linear as t
    from kernels.fp8_linear import FP8_MAX, MIN_SCALE
    for static, ub, k in ((False, False, 4096), (False, True, 14336), (True, False, 4096)):
        block, warps = t.block_and_warps(k)
        c = compile_kernel(
            t._quantize_rows_kernel,
            dict(STATIC=static, HAS_UB=ub, BLOCK=block, FP8_MAX_=FP8_MAX, MIN_SCALE_=MIN_SCALE),
            dict(x_ptr="bf16", q_ptr="fp8e4nv", scale_ptr="fp32", static_scale_ptr="fp32"),
            floats=("scale_ub",), num_warps=warps)
        ptx = c.asm["ptx"]
        print(static, ub, k, report(c), "div.rn.f32" in ptx, "cvt.rn.satfinite.e4m3x2.f32" in ptx)
""")


SKINNY_INTERPRETED = textwrap.dedent("""
    import torch
    from kernels.fp8_linear import Fp8Weight, w8a16_linear_ref
    from kernels.triton_fp8_linear import GemvConfig, fp8_linear_skinny_triton, skinny_fp8_config
    from kernels.triton_linear import LinearConfig
    torch.manual_seed(0)
    for n, k in [(48, 64), (40, 72), (33, 100), (64, 1024)]:
        w = Fp8Weight.quantize(torch.randn(n, k) * torch.logspace(-2, 1, n)[:, None])
        for m in (1, 3, 16):
            for dtype, ulp in ((torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)):
                x = torch.randn(m, k).to(dtype)
                for bias in (None, torch.randn(n).to(dtype)):
                    gemv = (GemvConfig(4, 32, 2, 2), GemvConfig(2, 64, 1), GemvConfig(4, 64, 2, vec=16))
                    gemv = gemv if m == 1 else ()
                    for cfg in (None, LinearConfig(16, 64, 4, 2), *gemv):
                        out = fp8_linear_skinny_triton(x, w.weight, w.scale, bias, config=cfg)
                        ref = w8a16_linear_ref(x, w.weight, w.scale, bias)
                        assert out.dtype == dtype and out.shape == (m, n)
                        # The interpreter rounds fp32 -> 16 bits toward zero and sums in another
                        # order: two units of the last place, and fp32 rounding near zero.
                        bound = 4 * ulp * ref.float().abs() + 1e-5 * ref.float().abs().max()
                        assert bool(((out.float() - ref.float()).abs() <= bound).all()), (n, k, m, dtype, cfg)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)  # leading dims kept
    w = Fp8Weight.quantize(torch.randn(48, 64))
    assert fp8_linear_skinny_triton(x, w.weight, w.scale).shape == (2, 3, 48)
    for bad, cfg in ((torch.randn(17, 64, dtype=torch.bfloat16), None), (torch.randn(2, 64), None),
                     (torch.randn(2, 64, dtype=torch.bfloat16), GemvConfig(4, 64, 4))):
        try:
            fp8_linear_skinny_triton(bad, w.weight, w.scale, config=cfg)
        except ValueError:
            pass
        else:
            raise AssertionError(bad.shape)
    assert skinny_fp8_config(4096, 4096).block_k == 1024 and skinny_fp8_config(28672, 4096).block_k == 512
    print("ok")
""")


def test_skinny_w8a16_kernel_in_the_interpreter_matches_the_reference() -> None:
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-c", SKINNY_INTERPRETED], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_triton_kernel_compiles_for_sm90_with_ieee_division_and_nearest_even_casts() -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILED], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3
    for line in lines:
        assert "stack 0 B" in line and line.endswith("True True"), line


SKINNY_COMPILED = textwrap.dedent("""
    import sys
    sys.path.insert(0, "scripts")
    from kernel_resources import compile_kernel, report
    from kernels import triton_fp8_linear as t
    for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)):  # llama3-8b
        for dtype in ("bf16", "fp16"):
            cfg = t.skinny_fp8_config(n, k)
            c = compile_kernel(
                t._skinny_fp8_linear_kernel,
                dict(HAS_BIAS=True, BLOCK_M=t.MAX_ROWS, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=True,
                     UPCAST=False),
                dict(x_ptr=dtype, w_ptr="fp8e4nv", w_scale_ptr="fp32", b_ptr=dtype, out_ptr=dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, aligned=True)
            print("dot", n, k, dtype, report(c))
            cfg = t.gemv_fp8_config(n, k)
            for pdl in (False, True):
                kernel, extra = ((t._gemv_fp8_vec_kernel, dict(VEC=cfg.vec)) if cfg.vec
                                 else (t._gemv_fp8_kernel, dict(UNROLL=1 + pdl)))
                c = compile_kernel(
                    kernel, dict(HAS_BIAS=True, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=True,
                                 PDL=pdl, **extra),
                    dict(x_ptr=dtype, w_ptr="fp8e4nv", w_scale_ptr="fp32", b_ptr=dtype, out_ptr=dtype),
                    num_warps=cfg.num_warps, aligned=True)
                ptx = c.asm["ptx"]
                # PDL (kernels/pdl.py): the dependents launched, the wait after the first weight loads
                has_pdl = "griddepcontrol.launch_dependents" in ptx and "griddepcontrol.wait" in ptx
                first_load = ptx.find("ld.global")
                print("gemv", n, k, dtype, report(c), has_pdl == pdl,
                      not pdl or 0 <= first_load < ptx.find("griddepcontrol.wait"))
""")


def test_skinny_w8a16_kernel_compiles_for_sm90_without_spills() -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SKINNY_COMPILED], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**env, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 24 and sum(line.startswith("gemv") for line in lines) == 16
    for line in lines:
        assert "stack 0 B" in line, line
        shared = int(line.split("shared ")[1].split(" B")[0])
        assert shared <= 232448, line  # Hopper's 227 KB a block may opt in to
        if line.startswith("dot"):
            assert "K/V buffers ['3', '3']" in line, line  # x and W tiles pipelined (num_stages 4)
        else:
            assert line.endswith("True True"), line


# ---- on a GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DTYPE_ID)
def test_triton_quantization_equals_the_reference_bit_for_bit_on_gpu(dtype) -> None:
    from kernels.triton_fp8_linear import quantize_rows_triton

    for m, k in [(1, 4096), (16, 4096), (512, 14336), (3, 100)]:
        x = rows_with_outliers(m, k, dtype).cuda()
        x[-1, :5] = 0
        for kw in ({}, {"scale_ub": 2.0}, {"static_scale": torch.tensor(0.02, device="cuda")}):
            q, s = quantize_rows_triton(x, **kw)
            qr, sr = quantize_rows_ref(x, **kw)
            assert torch.equal(s, sr), (m, k, kw)
            assert torch.equal(bits(q), bits(qr)), (m, k, kw)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("proj", list(LLAMA3_8B))
def test_scaled_mm_matches_the_reference_at_llama3_8b_shapes(proj, monkeypatch) -> None:
    """bf16 activations at decode (1..16 rows) and prefill (512 rows) sizes: `_scaled_mm` against
    the same quantized operands multiplied in fp32 and rounded to bf16 once."""
    n, k = LLAMA3_8B[proj]
    g = torch.Generator(device="cuda").manual_seed(0)
    w = Fp8Weight.quantize(torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02)
    bias = torch.randn(n, device="cuda", generator=g, dtype=torch.bfloat16) * 0.1
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(fp8_module, "_SKINNY_LINEAR", "0")  # PAGODA_SKINNY_LINEAR=0: no W8A16 at <= 16 rows
    for m in (1, 2, 7, 16, 512):
        x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
        for b in (None, bias):
            out = w(x, b)
            ref = fp8_linear_ref(x, w.weight, w.scale, b)
            assert out.dtype == torch.bfloat16 and out.shape == (m, n)
            # cuBLAS's FP8 sum is not an fp32 sum of the same products in order: 3.3e-3 (o, K 4096)
            # and 4.1e-3 (down, K 14336) measured on the H200 against this fp32 reference.
            assert _rel(out, ref) < 6e-3, (m, b is not None)
            assert (out.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max(), (m, b is not None)
    assert len(calls) == 10  # every call took _scaled_mm


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=DTYPE_ID)
def test_scaled_mm_for_other_activation_dtypes_static_scales_and_bounds(dtype, monkeypatch) -> None:
    """fp16/fp32 models get the bf16 product cast (bias added after); a static input scale and
    fbgemm's bound go through the same path; odd shapes take the reference. (9 rows: W8A16's
    turned off, PAGODA_SKINNY_LINEAR=0.)"""
    monkeypatch.setattr(fp8_module, "_SKINNY_LINEAR", "0")
    g = torch.Generator(device="cuda").manual_seed(1)
    w = Fp8Weight.quantize(torch.randn(256, 512, device="cuda", generator=g) * 0.02)
    x = torch.randn(9, 512, device="cuda", generator=g).to(dtype)
    bias = (torch.randn(256, device="cuda", generator=g) * 0.1).to(dtype)
    for input_scale, ub in ((None, None), (torch.tensor(0.01, device="cuda"), None), (None, 1.0)):
        out = fp8_linear(x, w.weight, w.scale, bias, input_scale, ub)
        ref = fp8_linear_ref(x, w.weight, w.scale, bias, input_scale, ub)
        assert out.dtype == dtype and _rel(out, ref) < 5e-3
    odd = Fp8Weight.quantize(torch.randn(40, 72, device="cuda", generator=g))  # 72 inputs: no _scaled_mm
    xo = torch.randn(3, 72, device="cuda", generator=g).to(dtype)
    assert torch.equal(odd(xo), fp8_linear_ref(xo, odd.weight, odd.scale))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("proj", list(LLAMA3_8B))
def test_skinny_w8a16_matches_the_reference_at_llama3_8b_decode_shapes(proj, m, monkeypatch) -> None:
    """Decode-sized bf16 inputs through `Fp8Weight` take the W8A16 kernel (no `_scaled_mm`),
    against x times the dequantized weight in fp32, rounded to bf16 once."""
    n, k = LLAMA3_8B[proj]
    g = torch.Generator(device="cuda").manual_seed(m)
    w = Fp8Weight.quantize(torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02)
    bias = torch.randn(n, device="cuda", generator=g, dtype=torch.bfloat16) * 0.1
    monkeypatch.setattr(torch, "_scaled_mm", None)  # W8A16 at <= 16 rows: never called
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    for b in (None, bias):
        out = w(x, b)
        ref = w8a16_linear_ref(x, w.weight, w.scale, b)
        assert out.dtype == torch.bfloat16 and out.shape == (m, n)
        assert _rel(out, ref) < 5e-3, b is not None
        assert (out.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max(), b is not None
    # More accurate than W8A8 against the unquantized product (the same e4m3 weight).
    exact = x.double() @ w.dequantize().double().t()
    assert _rel(w(x), exact) < _rel(fp8_linear_ref(x, w.weight, w.scale), exact)


@pytest.mark.gpu
def test_skinny_w8a16_fp16_odd_shapes_static_scales_and_the_switch(monkeypatch) -> None:
    """fp16 activations and shapes `_scaled_mm` does not take (72 inputs, 40 outputs) go through
    the kernel too; a static input scale is not used (x is not quantized); PAGODA_SKINNY_LINEAR=0
    sends the same call to `_scaled_mm`; more than 16 rows never take the kernel."""
    g = torch.Generator(device="cuda").manual_seed(2)
    for n, k in ((40, 72), (256, 512)):
        w = Fp8Weight.quantize(torch.randn(n, k, device="cuda", generator=g) * 0.02)
        w.input_scale = torch.tensor(0.01, device="cuda")
        bias = (torch.randn(n, device="cuda", generator=g) * 0.1).half()
        for m in (1, 5, 16):
            x = torch.randn(m, k, device="cuda", generator=g).half()
            out = w(x, bias)
            assert out.dtype == torch.float16 and _rel(out, w8a16_linear_ref(x, w.weight, w.scale, bias)) < 5e-3
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(4, 512, device="cuda", generator=g, dtype=torch.bfloat16)
    w(x)
    assert not calls
    w(torch.randn(17, 512, device="cuda", generator=g, dtype=torch.bfloat16))
    assert len(calls) == 1
    monkeypatch.setattr(fp8_module, "_SKINNY_LINEAR", "0")
    assert _rel(w(x), fp8_linear_ref(x, w.weight, w.scale, None, w.input_scale)) < 5e-3 and len(calls) == 2
