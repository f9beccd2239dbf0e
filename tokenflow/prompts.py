"""The three prompts of an edit (inversion, negative, target) made into text embeddings."""

from __future__ import annotations

import warnings

import torch

from .config import RunConfig
from .edit import PromptEmbeddings


def tokenize_prompts(tokenizer, prompts: dict[str, str]) -> tuple[torch.Tensor, list[str]]:
    """{name: text} -> token ids [len(prompts), 77] in that order, and the tokenizer's warnings
    (a prompt cut to 77 tokens) with the prompt named by its setting."""
    ids, messages = [], []
    for name, text in prompts.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids.append(tokenizer([text]))
        for w in caught:
            message = str(w.message)
            messages.append(f"{name} {message[len('prompt 0 '):]}" if message.startswith("prompt 0 ") else f"{name}: {message}")
    return torch.cat(ids), messages


@torch.no_grad()
def embed_prompts(models, cfg: RunConfig, device: str) -> tuple[PromptEmbeddings, list[str]]:
    """cfg's inversion, negative and target prompts -> their embeddings [1, 77, C] and the warnings."""
    ids, messages = tokenize_prompts(models.tokenizer, {
        "inversion_prompt": cfg.inversion_prompt, "negative_prompt": cfg.negative_prompt, "prompt": cfg.prompt})
    emb = models.text_encoder(ids.to(device))  # [3, 77, C]
    return PromptEmbeddings(source=emb[0:1], negative=emb[1:2], target=emb[2:3]), messages
