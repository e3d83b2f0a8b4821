"""The four networks (diffusers / transformers modules), their weights sources and the CLIP tokenizer."""

from models.bundle import ModelBundle
from models.loader import describe_sources, load_bundle, resolve_weights_id

__all__ = ["ModelBundle", "describe_sources", "load_bundle", "resolve_weights_id"]
