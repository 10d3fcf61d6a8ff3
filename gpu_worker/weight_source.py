"""A checkpoint tensor not read yet: its shape, and reads of the rows or columns a rank keeps.

Safetensors files are read through `safe_open(...).get_slice(name)`, which reads only the
bytes of the requested slice, so a tensor-parallel rank never holds more of a checkpoint than
its own part (plus one tensor's worth of its slice at a time). Tensors that only exist whole
(GGUF after dequantization, PyTorch .bin files) are sliced in memory.
"""

from __future__ import annotations

from typing import Any

import torch


class WeightSource:
    """One checkpoint tensor, in our orientation ([out, in] for a linear's weight)."""

    def __init__(self, data: Any, transposed: bool = False) -> None:
        # A torch.Tensor, or a safetensors slice (get_shape(), and indexing that reads).
        self._data = data
        self._transposed = transposed
        shape = tuple(data.shape) if isinstance(data, torch.Tensor) else tuple(data.get_shape())
        self.shape = shape[::-1] if transposed and len(shape) == 2 else shape

    def t(self) -> WeightSource:
        """The same tensor read transposed (GPT-2's Conv1D weights are stored [in, out])."""
        if len(self.shape) != 2:
            return self
        return WeightSource(self._data, not self._transposed)

    def full(self) -> torch.Tensor:
        if not self.shape:  # a scalar (an FP8 checkpoint's per-tensor scale): no slicing
            return self._data[()]
        return self._read(slice(None), slice(None)) if len(self.shape) == 2 else self._data[:]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if len(self.shape) == 1:
            return self._data[start:stop]
        return self._read(slice(start, stop), slice(None))

    def cols(self, start: int, stop: int) -> torch.Tensor:
        return self._read(slice(None), slice(start, stop))

    def _read(self, rows: slice, cols: slice) -> torch.Tensor:
        if self._transposed:
            return self._data[cols, rows].t()
        return self._data[rows, cols]
