"""The wire: messages, `EngineConfig` and socket helpers shared by every Pagoda process."""

from protocol.config import EMBEDDED_MODEL_NAME, EngineConfig, decode_config, encode_config
from protocol.messages import *  # noqa: F403
from protocol.messages import SamplingParams
from protocol.sockets import Decoder, bind_router, connect_dealer, encode

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "Decoder",
    "EngineConfig",
    "SamplingParams",
    "bind_router",
    "connect_dealer",
    "decode_config",
    "encode",
    "encode_config",
]
