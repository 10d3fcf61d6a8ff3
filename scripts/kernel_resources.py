"""Compile the paged-attention kernel for Hopper (sm_90) on a machine without a GPU and report
what each tiling costs: registers, spills, shared memory, and how many K/V buffers Triton's
pipeliner allocated (1 means loads do not overlap the math).

    python scripts/kernel_resources.py                   # the default tilings
    python scripts/kernel_resources.py 128,64,8,5 16,32,4,5   # block_m,tile_n,warps,stages

Uses the ptxas and cuobjdump that ship inside the triton wheel; no device time needed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import triton_paged_attention as attn  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_tiling(block_m: int, tile_n: int, warps: int, stages: int, group: int = 4, head_dim: int = 128,
                   splits: int = 1, dtype: str = "bf16"):
    kernel = attn._paged_attention_kernel
    consts = dict(NUM_HEADS=8 * group, GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim, BLOCK_SIZE=16,
                  BLOCK_M=block_m, BLOCK_Q=block_m // group, TILE_N=tile_n, NUM_SPLITS=splits,
                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False)
    pointers = dict(q_ptr=dtype, k_cache_ptr=dtype, v_cache_ptr=dtype, out_ptr=dtype, part_out_ptr="fp32",
                    part_lse_ptr="fp32", block_tables_ptr="i32", seq_lens_ptr="i32", query_start_loc_ptr="i32")
    signature = {}
    for name in kernel.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    # What the launcher sees at run time: 16-byte aligned pointers and strides divisible by 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if n.endswith("_ptr") or n.startswith("stride")}
    return triton.compile(ASTSource(kernel, signature, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def report(compiled) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    buffers = re.findall(r"local_alloc : \(\) -> !ttg.memdesc<(\d+)x\d+x\d+x", compiled.asm["ttgir"])
    return (f"regs {regs.group(1)}, stack {regs.group(2)} B, shared {compiled.metadata.shared} B, "
            f"K/V buffers {buffers[:2]}")


if __name__ == "__main__":
    specs = sys.argv[1:] or ["16,32,4,5", "128,64,8,5"]
    for spec in specs:
        block_m, tile_n, warps, stages = (int(x) for x in spec.split(","))
        print(f"block_m {block_m} tile_n {tile_n} warps {warps} stages {stages}: "
              f"{report(compile_tiling(block_m, tile_n, warps, stages))}")
