"""Model definitions, looked up by the `architectures` name of a Hugging Face config."""

from __future__ import annotations

from torch import nn

from gpu_worker.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
}
