"""Model definitions, looked up by the `architectures` name of a Hugging Face config."""

from __future__ import annotations

from gpu_worker.models.base import CausalLM
from gpu_worker.models.gpt2 import GPT2LMHeadModel
from gpu_worker.models.llama import LlamaForCausalLM
from gpu_worker.models.opt import OPTForCausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "OPTForCausalLM": OPTForCausalLM,
}
