"""SD-2.1's text side: CLIP's BPE tokenizer (OpenCLIP ids) and the OpenCLIP text encoder (see model.py)."""

from .keys import IGNORED_KEYS, ldm_to_transformers, ldm_unused_keys, normalise_transformers_keys
from .model import Block, TextConfig, TextEncoder
from .tokenizer import Tokenizer

__all__ = [
    "Block", "IGNORED_KEYS", "TextConfig", "TextEncoder", "Tokenizer",
    "ldm_to_transformers", "ldm_unused_keys", "normalise_transformers_keys",
]
