"""`--load-format dummy`: random weights made at load from config.json alone, every parameter filled."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from gpu_worker.dummy_weights import INIT_STD, fill_dummy_weights, read_config_only
from gpu_worker.layers import RMSNorm
from gpu_worker.loader import ModelLoadError, load_model
from gpu_worker.model_config import build_model_config
from gpu_worker.models import MODEL_REGISTRY
from protocol.config import EngineConfig
from tests.model_check import make_runner, random_prompts, runner_greedy, runner_last_logits
from tests.tiny_models import FAMILIES, family_config

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture()
def config_only(tiny, tmp_path):
    """The tiny Llama's folder with its weights deleted: config.json, generation_config.json, tokenizer."""
    folder, _ = tiny("llama")
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json"))
    assert not list(bare.glob("*.safetensors"))
    return bare


def nan_storage(monkeypatch) -> None:
    """Every module `to_empty` makes starts as NaN, so a parameter the filler skips shows."""
    to_empty = nn.Module.to_empty

    def to_nan(self, *args, **kwargs):
        module = to_empty(self, *args, **kwargs)
        with torch.no_grad():
            for p in module.parameters():
                p.fill_(float("nan"))
        return module

    monkeypatch.setattr(nn.Module, "to_empty", to_nan)


def build_nan_module(family: str) -> nn.Module:
    hf_class, hf_config = family_config(family, 320)
    model_class = MODEL_REGISTRY[hf_class.__name__]
    with torch.device("meta"):
        module = model_class(build_model_config(model_class, hf_config.to_dict()))
    module = module.to_empty(device=CPU)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(float("nan"))
    return module


def test_a_folder_without_weights_loads_and_runs_with_dummy_weights(config_only, tiny, monkeypatch) -> None:
    nan_storage(monkeypatch)
    loaded = load_model(EngineConfig(model=str(config_only), load_format="dummy", device="cpu"), CPU)
    params = dict(loaded.model.named_parameters())
    assert params and all(torch.isfinite(p).all() for p in params.values()), "a parameter was left unfilled"
    assert loaded.model.model.norm.weight.eq(1).all()
    assert 0.01 < loaded.model.model.embed_tokens.weight.std().item() < 0.03
    # The EOS ids and head layout come from the config, as in a load of the saved weights.
    saved = load_model(EngineConfig(model=str(tiny("llama")[0]), device="cpu"), CPU)
    assert loaded.eos_token_ids == saved.eos_token_ids and loaded.eos_token_ids
    assert (loaded.num_layers, loaded.num_kv_heads, loaded.head_dim) == (saved.num_layers, saved.num_kv_heads,
                                                                         saved.head_dim)
    monkeypatch.undo()

    runner = make_runner(str(config_only), load_format="dummy")
    prompts = random_prompts(320)
    assert torch.isfinite(runner_last_logits(runner, prompts)).all()
    assert all(len(tokens) == 4 for tokens in runner_greedy(runner, prompts, max_tokens=4))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_parameter_is_filled_norms_with_ones_biases_with_zeros(family) -> None:
    module = build_nan_module(family)
    filled = fill_dummy_weights(module, seed=0)
    assert filled == [name for name, _ in module.named_parameters()]
    modules = dict(module.named_modules())
    for name, p in module.named_parameters():
        assert torch.isfinite(p).all(), name
        owner = modules[name.rpartition(".")[0]]
        if name.endswith(".bias"):
            assert p.eq(0).all(), name
        elif isinstance(owner, (RMSNorm, nn.LayerNorm)):
            assert p.eq(1).all(), name
        else:
            assert p.dim() == 2 and abs(p.std().item() - INIT_STD) < 0.2 * INIT_STD, name


def test_the_same_seed_gives_the_same_weights_and_another_seed_others() -> None:
    def weights(seed: int) -> dict[str, torch.Tensor]:
        module = build_nan_module("qwen3")
        fill_dummy_weights(module, seed)
        return {k: v.clone() for k, v in module.state_dict().items()}

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    matrices = [k for k in a if a[k].dim() == 2]
    assert matrices and not any(torch.equal(a[k], c[k]) for k in matrices)
    # Each parameter draws on its own generator: two layers' same projection differ.
    assert not torch.equal(a["model.layers.0.mlp.down_proj.weight"], a["model.layers.1.mlp.down_proj.weight"])


def test_the_engine_seed_seeds_the_dummy_weights(config_only) -> None:
    def embedding(seed: int) -> torch.Tensor:
        config = EngineConfig(model=str(config_only), load_format="dummy", device="cpu", seed=seed)
        return load_model(config, CPU).model.model.embed_tokens.weight

    assert torch.equal(embedding(3), embedding(3)) and not torch.equal(embedding(3), embedding(4))


def test_unknown_load_format_gguf_and_missing_config_are_one_line_errors(config_only, tmp_path) -> None:
    def error(**kw: object) -> str:
        with pytest.raises(ModelLoadError) as info:
            load_model(EngineConfig(device="cpu", **kw), CPU)
        assert "\n" not in str(info.value)
        return str(info.value)

    # Without the flag, a folder without weights is still an error.
    assert "no weights in" in error(model=str(config_only))
    message = error(model=str(config_only), load_format="bogus")
    assert "load_format" in message and "'bogus'" in message and "auto, dummy" in message
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert "needs a model folder with a config.json" in error(model=str(gguf), load_format="dummy")
    (config_only / "config.json").unlink()
    assert "has no config.json" in error(model=str(config_only), load_format="dummy")


def test_read_config_only_gives_the_config_eos_ids_and_dtype(config_only) -> None:
    info = read_config_only(str(config_only))
    assert info.hf_config["architectures"] == ["LlamaForCausalLM"]
    assert info.eos_token_ids and info.dtype == torch.float32
