"""Tiny random models of every supported family, saved as Hugging Face folders with a tokenizer.

Each keeps its family's real head layout (GQA/MQA, explicit head_dim, biases, learned
positions, OPT's projections) at widths of 64-128, so a model builds, saves and runs in well
under a second. A wide init spreads the logits, so greedy tokens have no near-ties that
float noise could flip.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps keys and values in fixed-size blocks.",
    "A tokenizer turns text into ids; a model turns ids into logits.",
    "Pagoda serves language models through an OpenAI-compatible API.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
]
SPECIAL = ["<|endoftext|>", "<pad>"]
# Weights 10x the usual init spread the logits, so greedy tokens have no near-ties for float
# noise to flip; REAL_INIT (transformers' default) gives activations of a trained model's scale.
WIDE_INIT = 0.2
REAL_INIT = 0.02


def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences: every id decodes, any text encodes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")


def _llama_like(vocab: int, init: float, **kw: object) -> dict:
    base = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=init,
    )
    return {**base, **kw}


def _opt(vocab: int, init: float, **kw: object) -> dict:
    # word_embed_proj_dim below hidden_size: opt-350m's project_in/out, tested in both variants.
    base = dict(
        vocab_size=vocab,
        hidden_size=64,
        word_embed_proj_dim=32,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        init_std=init,
    )
    return {**base, **kw}


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # below the prompts' lengths, so the scaling shows
}


def family_config(
    family: str, vocab: int, init: float = WIDE_INIT, **ids: int
) -> tuple[type[PreTrainedModel], PretrainedConfig]:
    """The transformers class and a tiny config of `family` (a FAMILIES name); `ids`: special token ids."""
    if family == "llama":  # Llama 3.1/3.2: GQA, llama3 rope scaling, untied head, 3 layers
        kw = _llama_like(vocab, init, num_hidden_layers=3, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)
        return LlamaForCausalLM, LlamaConfig(**kw, **ids)
    if family == "smollm2":  # Llama with tied embeddings and 3:1 GQA
        kw = _llama_like(vocab, init, hidden_size=96, num_attention_heads=6, tie_word_embeddings=True)
        return LlamaForCausalLM, LlamaConfig(**kw, **ids)
    if family == "mistral":  # MQA (one KV head), untied, no sliding window (v0.2+)
        kw = _llama_like(vocab, init, num_key_value_heads=1, tie_word_embeddings=False, sliding_window=None)
        return MistralForCausalLM, MistralConfig(**kw, **ids)
    if family == "qwen2":  # QKV bias, tied (Qwen2.5-1.5B)
        return Qwen2ForCausalLM, Qwen2Config(**_llama_like(vocab, init, tie_word_embeddings=True), **ids)
    if family == "qwen3":  # q/k RMSNorm, head_dim above hidden / heads
        return Qwen3ForCausalLM, Qwen3Config(**_llama_like(vocab, init, head_dim=32, tie_word_embeddings=True), **ids)
    if family == "gpt2":  # learned positions, Conv1D weights, MHA, gelu_new
        kw = dict(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=init)
        return GPT2LMHeadModel, GPT2Config(**kw, **ids)
    if family == "opt":  # opt-125m's pre-LN
        return OPTForCausalLM, OPTConfig(**_opt(vocab, init), **ids)
    if family == "opt-350m":  # post-LN (do_layer_norm_before=False), no final norm
        return OPTForCausalLM, OPTConfig(**_opt(vocab, init, do_layer_norm_before=False), **ids)
    raise ValueError(family)


FAMILIES = ["llama", "smollm2", "mistral", "qwen2", "qwen3", "gpt2", "opt", "opt-350m"]


def build_tiny_model(
    family: str,
    folder: Path,
    tokenizer: PreTrainedTokenizerFast | None = None,
    seed: int = 0,
    init: float = WIDE_INIT,
    **save_kw: object,
) -> PreTrainedModel:
    """Save a random tiny `family` model (and the tokenizer) in `folder`; return it in fp32 eval mode."""
    tokenizer = tokenizer or tiny_tokenizer()
    eos = tokenizer.eos_token_id
    model_class, config = family_config(
        family, len(tokenizer), init, bos_token_id=eos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    _spread_norm_weights(model)
    model.save_pretrained(folder, **save_kw)
    tokenizer.save_pretrained(folder)
    return model


def _spread_norm_weights(model: PreTrainedModel) -> None:
    """Random norm gains and biases (init leaves them 1 and 0), so a swapped one shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.endswith("ln_f.weight") or name.endswith("ln_f.bias"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))


def fake_hub_cache(root: Path, repo_id: str, snapshots: dict[str, Path], refs: dict[str, str]) -> Path:
    """A Hugging Face cache holding `repo_id` at the given commits, with branch/tag refs."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    for commit, folder in snapshots.items():
        shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    for ref, commit in refs.items():
        (repo / "refs" / ref).write_text(commit)
    return root
