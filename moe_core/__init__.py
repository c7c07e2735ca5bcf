"""A small, real hybrid MoE language model (torch only) that the goodput hooks observe."""

from moe_core.config import ModelConfig, model_plan, parse_pattern
from moe_core.data import ByteCorpus
from moe_core.model import MoEModel, build_model

__all__ = ["ByteCorpus", "ModelConfig", "MoEModel", "build_model", "model_plan", "parse_pattern"]
