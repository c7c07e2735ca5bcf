"""A small, real hybrid MoE language model (torch only) that the goodput hooks observe."""

from moe_core.config import ModelConfig, model_plan, parse_pattern
from moe_core.data import ByteCorpus
from moe_core.dispatch import DISPATCH_BACKENDS, Dispatcher
from moe_core.model import MoEModel, build_model
from moe_core.router import Routing, TopKRouter

__all__ = [
    "DISPATCH_BACKENDS",
    "ByteCorpus",
    "Dispatcher",
    "ModelConfig",
    "MoEModel",
    "Routing",
    "TopKRouter",
    "build_model",
    "model_plan",
    "parse_pattern",
]
