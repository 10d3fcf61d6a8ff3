"""What the machine can do, measured at the start of every run, and the run's provenance."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from typing import Any

import torch


def _timed(fn: Any, device: str, repeat: int) -> float:
    """Seconds per call of `fn`, after a warm-up."""
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / repeat
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a device-to-device copy, counting the read and the write (H100: ~3.0 TB/s)."""
    n = (1 << 30) if device.startswith("cuda") else (1 << 27)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / _timed(lambda: dst.copy_(src), device, 20 if device.startswith("cuda") else 5)


def matmul_rate(device: str) -> float:
    """FLOP/s of a large bf16 matrix product on a GPU (float32 on the CPU)."""
    cuda = device.startswith("cuda")
    n = 8192 if cuda else 1024
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _timed(lambda: a @ b, device, 20 if cuda else 3)


def describe(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for mod in ("triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    # A copy of the working tree made without its history (a GPU machine's) names its commit
    # in PAGODA_GIT_COMMIT; otherwise git says, and whether tracked files differ from it.
    info["git_commit"] = os.environ.get("PAGODA_GIT_COMMIT") or _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    info["git_dirty"] = None if status is None or "PAGODA_GIT_COMMIT" in os.environ else bool(status)
    return info


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def measure(device: str) -> dict[str, float]:
    return {"copy_bandwidth_bytes_per_s": copy_bandwidth(device), "matmul_flops_per_s": matmul_rate(device)}
