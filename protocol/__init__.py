"""The wire: messages, `EngineConfig` and socket helpers shared by every Pagoda process."""

from protocol.config import EMBEDDED_MODEL_NAME, EngineConfig, decode_config, encode_config
from protocol.messages import *  # noqa: F403
from protocol.messages import SamplingParams
from protocol.sockets import Codec, bind_router, connect_dealer

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "Codec",
    "EngineConfig",
    "SamplingParams",
    "bind_router",
    "connect_dealer",
    "decode_config",
    "encode_config",
]
