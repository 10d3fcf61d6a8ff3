"""Kernels: each Triton kernel beside a plain-PyTorch reference with the same signature.

The references are the CPU path; the Triton kernels (added beside them) are the GPU path.
"""

from kernels.kv_cache import write_kv_ref
from kernels.paged_attention import paged_attention_ref

__all__ = ["paged_attention_ref", "write_kv_ref"]
