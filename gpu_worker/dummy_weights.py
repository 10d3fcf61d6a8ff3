"""`--load-format dummy` (vLLM's name): random weights made on the device, no weight file read.

For benchmarks of shapes too large to save (llama3-70b): the model folder needs only its
config.json (and, for the EOS ids, generation_config.json); any weights in it are ignored.
Every parameter the module has is filled where it lies, so a module that holds only this
rank's slice of each weight (tensor parallelism) is filled the same way: normal(0, 0.02) for
matrices and embeddings, ones for norm gains, zeros for biases.

Each parameter draws from its own generator, seeded from the seed and the parameter's name:
the same seed gives the same weights whatever the order of filling, and a parameter every
rank holds whole (a norm, a replicated embedding) is identical on every rank.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from gpu_worker.checkpoint import Checkpoint, read_hf_folder
from gpu_worker.layers import RMSNorm
from tokenizer_svc.model_source import ModelLoadError, resolve_model_path

LOAD_FORMATS = ("auto", "dummy")
INIT_STD = 0.02  # transformers' initializer_range: activations of a trained model's scale
NORMS = (RMSNorm, nn.LayerNorm)


def read_config_only(model: str | None, revision: str | None = None) -> Checkpoint:
    """config.json (and generation_config.json's EOS ids) of `model`'s folder; no weights needed."""
    path = resolve_model_path(model, revision)
    if path.is_file():
        raise ModelLoadError(
            f"load_format dummy needs a model folder with a config.json, not the file {path}"
        )
    return read_hf_folder(path, weights=False)


@torch.no_grad()
def fill_dummy_weights(module: nn.Module, seed: int = 0, std: float = INIT_STD) -> list[str]:
    """Fill every parameter of `module` in place on its own device; return their names.

    normal(0, std) for matrices and embeddings, ones for the gain of a norm (RMSNorm,
    nn.LayerNorm), zeros for biases. A parameter shared by two modules (tied embeddings) is
    filled once.
    """
    modules = dict(module.named_modules())
    filled = []
    for name, param in module.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        owner = modules[owner_name]
        if param.device.type == "meta":
            raise ValueError(f"parameter {name} is on the meta device: give it storage before filling it")
        if leaf == "bias":
            param.zero_()
        elif leaf == "weight" and param.dim() == 1 and _is_norm(owner):
            param.fill_(1.0)
        else:
            generator = torch.Generator(device=param.device)
            generator.manual_seed(param_seed(seed, name))
            param.normal_(0.0, std, generator=generator)
        filled.append(name)
    return filled


def param_seed(seed: int, name: str) -> int:
    """The seed of parameter `name`'s generator: the run's seed and the name's CRC-32."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORMS) or type(module).__name__.endswith("Norm")
