"""The physical limit of a workload: bytes over the copy bandwidth, FLOPs over the matrix rate."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from bench.shapes import kv_bytes_per_token, model_bytes_and_params


@dataclass
class ModelCost:
    weight_bytes: int
    matmul_params: int  # parameters a token's forward multiplies by (not the embedding lookup)
    kv_bytes_per_token: int
    attn_flops_per_token_pair: int  # 4 * layers * heads * head_dim: QK^T and PV
    bandwidth: float
    flops: float
    lm_head_params: int = 0  # vocab x hidden: the one matmul `--quantization fp8` leaves as it was
    params: int = 0  # all of the file's parameters (weight_bytes / params: the bytes of one)
    tied: bool = False  # the LM head is the embedding's matrix

    @classmethod
    def of(cls, folder: str, hw: dict[str, float], kv_dtype_bytes: int) -> ModelCost:
        weight_bytes, params = model_bytes_and_params(folder)
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        embed = cfg["vocab_size"] * cfg["hidden_size"]
        # Tied weights are counted once in the file but multiply twice (lookup is free, lm_head is not).
        matmul = params - embed + (embed if cfg.get("tie_word_embeddings") else 0)
        return cls(
            weight_bytes=weight_bytes,
            matmul_params=matmul,
            kv_bytes_per_token=kv_bytes_per_token(folder, kv_dtype_bytes),
            attn_flops_per_token_pair=4 * cfg["num_hidden_layers"] * cfg["num_attention_heads"] * head_dim,
            bandwidth=hw["copy_bandwidth_bytes_per_s"],
            flops=hw["matmul_flops_per_s"],
            lm_head_params=embed,
            params=params,
            tied=bool(cfg.get("tie_word_embeddings")),
        )

    def with_fp8_linears(self, lm_head: bool = False) -> ModelCost:
        """The cost under `--quantization fp8`: the decoder's linears read one byte a weight
        instead of the checkpoint's two or four; the LM head (unless `lm_head`: an untied one
        under `--fp8-lm-head`) and the embedding keep theirs."""
        decoder = max(0, self.matmul_params - (0 if lm_head and not self.tied else self.lm_head_params))
        elem = self.weight_bytes / self.params if self.params else 2.0
        return dataclasses.replace(self, weight_bytes=max(0, round(self.weight_bytes - decoder * (elem - 1))))

    def with_int4_linears(self, group_size: int = 128) -> ModelCost:
        """The cost with GPTQ / AWQ 4-bit decoder linears (W4A16): half a byte a weight plus a
        16-bit scale and zero per group of `group_size` input rows; the LM head and the
        embedding keep their bytes."""
        decoder = max(0, self.matmul_params - self.lm_head_params)
        elem = self.weight_bytes / self.params if self.params else 2.0
        int4 = 0.5 + 4 / group_size
        return dataclasses.replace(self, weight_bytes=max(0, round(self.weight_bytes - decoder * (elem - int4))))

    def decode_step_seconds(self, total_context: int) -> float:
        return (self.weight_bytes + self.kv_bytes_per_token * total_context) / self.bandwidth

    def prefill_seconds(self, prompt_len: int, cached: int = 0) -> float:
        new = prompt_len - cached
        attn_pairs = sum(range(cached + 1, prompt_len + 1))  # causal: position p sees p keys
        return (2 * self.matmul_params * new + self.attn_flops_per_token_pair * attn_pairs) / self.flops
