"""Small host-to-device copies that never make the host wait for the device."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_device(values: Sequence | np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list or array as a tensor on `device`, queued behind the device's work.

    `torch.tensor(values, device=cuda)` synchronizes the stream after its copy, and a
    non-blocking copy from pageable memory may too (the driver may wait on the stream to
    stage it). Either stalls the host until the previous step is done, undoing the overlap of
    steps. So the values go through pinned memory: PyTorch's caching host allocator keeps the
    block until the copy has run.
    """
    host = torch.from_numpy(values) if isinstance(values, np.ndarray) else torch.tensor(values, dtype=dtype)
    if dtype is not None and host.dtype != dtype:
        host = host.to(dtype)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
