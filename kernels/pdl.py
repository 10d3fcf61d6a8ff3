"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's Triton kernels.

A decode step at batch 1 is some 300 short kernels, each a few microseconds; between two of
them the GPU drains the first grid, then launches and ramps up the second. With PDL a kernel
launched with the attribute (`launch_pdl=True`) may start while its predecessor in the stream
still runs: its programs begin, do what does not depend on the predecessor (a GEMV issues its
first weight loads), then wait at `griddepcontrol.wait` until the predecessor has finished and
its writes are visible. The predecessor lets its dependents launch early by executing
`griddepcontrol.launch_dependents` in every program (our kernels do it first thing: once every
program of the grid is resident or done, the next grid may be scheduled into the freed slots).

Rules every kernel here keeps, so that PDL is safe in any order of kernels:
- A kernel launched with PDL writes nothing before its `gdc_wait`, and reads before it only
  memory that no kernel still running can be writing: weights and other constants, and what was
  written before the last launch without PDL that precedes it in the stream. Such a launch
  (PyTorch's, cuBLAS's, a copy) starts only once its predecessor has finished, and lets nothing
  after it start before it has finished itself; every forward begins with one (the embedding
  gather, after the rotary cos/sin gather and the step's input copies). So the step's inputs
  (slots, sequence lengths, block tables) and cos/sin may be read early (kernels/triton_qkv.py
  does), and so may the KV cache's entries of earlier steps; this step's K/V, q and activations
  may not.
- A kernel without the attribute (PyTorch's, cuBLAS's) waits for its predecessor as usual, and
  an early trigger in ours has no effect on it.
- The wait waits for the whole predecessor grid, whose own wait waited for its predecessor:
  ordering is transitive along the stream. CUDA graph capture keeps the programmatic edges.

`PAGODA_PDL=0` turns it off (every launch then as before). Off on the CPU (Triton's
interpreter has no griddepcontrol) and on GPUs before compute capability 9.0.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # Triton 3.3+
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _HAVE_GDC = True
except ImportError:  # older Triton: PDL off, the helpers below compile to nothing
    _HAVE_GDC = False

    @triton.jit
    def gdc_launch_dependents():
        pass

    @triton.jit
    def gdc_wait():
        pass


_ENV = os.environ.get("PAGODA_PDL", "1")
if _ENV not in ("0", "1"):
    raise ValueError(f"PAGODA_PDL must be 0 or 1, not {_ENV!r}")


@functools.cache
def _capable(index: int) -> bool:
    try:  # the launch option (Triton 3.4+)
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__ and torch.cuda.get_device_capability(index) >= (9, 0)


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels launched on `device` use PDL."""
    if _ENV == "0" or not _HAVE_GDC or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def pdl_kwargs(device: torch.device) -> dict:
    """The launch arguments of a kernel taking a `PDL` constexpr: PDL=True with the launch
    attribute where `pdl_enabled`, else PDL=False (and no attribute)."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(device) else {"PDL": False}


@triton.jit
def pdl_begin(PDL: tl.constexpr):
    """First in a kernel launched with `launch_pdl=PDL`: let the next kernel launch, then wait
    for the previous one (a no-op unless PDL)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def pdl_trigger(PDL: tl.constexpr):
    """Let the next kernel launch (for a kernel that reads constants before its `pdl_wait`)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    if PDL:
        gdc_wait()
