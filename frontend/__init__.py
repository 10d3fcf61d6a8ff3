"""The API frontend and the offline `LLM` API (the `pagoda` command is the `pagoda` package).

`LLM` is imported lazily so the `pagoda` command and the other processes do not pay for it.
"""

from typing import TYPE_CHECKING, Any

from protocol import SamplingParams

if TYPE_CHECKING:
    from frontend.llm import LLM

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from frontend.llm import LLM

        return LLM
    raise AttributeError(name)
