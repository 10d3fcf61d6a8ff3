"""The API frontend and the offline `LLM` API (the `pagoda` command is the `pagoda` package).

`LLM` is imported lazily so the `pagoda` command and the other processes do not pay for it.
"""

from typing import TYPE_CHECKING, Any

from protocol import SamplingParams
from protocol.messages import StructuredOutputs

# vLLM's name for the same thing (`vllm.sampling_params.StructuredOutputsParams`).
StructuredOutputsParams = StructuredOutputs

if TYPE_CHECKING:
    from frontend.llm import LLM

__all__ = ["LLM", "SamplingParams", "StructuredOutputs", "StructuredOutputsParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from frontend.llm import LLM

        return LLM
    raise AttributeError(name)
