"""The text side of SD-1.5 and SD-2.x: CLIP's BPE tokenizer (OpenCLIP's or transformers' rules, chosen by the
checkpoint) and the CLIP text transformer (OpenCLIP ViT-H/14 for SD-2.x, OpenAI ViT-L/14 for SD-1.5; see model.py)."""

from .keys import IGNORED_KEYS, ldm_to_transformers, ldm_unused_keys, normalise_transformers_keys
from .model import Block, TextConfig, TextEncoder
from .tokenizer import Tokenizer

__all__ = [
    "Block", "IGNORED_KEYS", "TextConfig", "TextEncoder", "Tokenizer",
    "ldm_to_transformers", "ldm_unused_keys", "normalise_transformers_keys",
]
