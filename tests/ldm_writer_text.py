"""Test-only: write a transformers-named text encoder the way the single SD-2.1 ldm file stores it.

Written independently of clip_text/keys.py (from the facts in sd21.md), so a test that writes with
this and reads with keys.py checks both directions against each other, not a mapping against itself.
Like the real file it has one block more than the diffusers export (random), plus `text_projection`
and `logit_scale`. The `cond_stage_model.model.` prefix is added by the caller.
"""

from __future__ import annotations

import torch

LAYER_PARTS = {  # transformers name inside a layer -> OpenCLIP name inside a resblock
    "layer_norm1": "ln_1",
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def transformers_text_to_ldm(
    state: dict[str, torch.Tensor], total_layers: int | None = None, *, seed: int = 0,
) -> dict[str, torch.Tensor]:
    """`text_model.*` tensors -> OpenCLIP text tower keys, with `total_layers` resblocks (default layers + 1)."""
    p = "text_model."
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith(p + "encoder.layers."))
    total_layers = layers + 1 if total_layers is None else total_layers
    width = state[p + "embeddings.token_embedding.weight"].shape[1]
    out = {
        "token_embedding.weight": state[p + "embeddings.token_embedding.weight"],
        "positional_embedding": state[p + "embeddings.position_embedding.weight"],
        "ln_final.weight": state[p + "final_layer_norm.weight"],
        "ln_final.bias": state[p + "final_layer_norm.bias"],
    }
    for i in range(layers):
        src, dst = f"{p}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [state[src + f"self_attn.{n}_proj.{kind}"] for n in ("q", "k", "v")], dim=0
            )
            for ours, theirs in LAYER_PARTS.items():
                out[dst + f"{theirs}.{kind}"] = state[src + f"{ours}.{kind}"]

    # The blocks SD-2 does not read: same shapes as block 0, random values (so using them would show).
    g = torch.Generator().manual_seed(seed)
    block0 = {k[len("transformer.resblocks.0."):]: v for k, v in out.items() if k.startswith("transformer.resblocks.0.")}
    for i in range(layers, total_layers):
        for name, v in block0.items():
            out[f"transformer.resblocks.{i}.{name}"] = torch.randn(v.shape, generator=g, dtype=v.dtype)
    out["text_projection"] = torch.randn(width, width, generator=g)  # OpenCLIP ViT-H: [1024, 1024]
    out["logit_scale"] = torch.tensor(4.6052)  # ln(100), a scalar
    return out


def transformers_text_to_ldm_sd1(state: dict[str, torch.Tensor], *, position_ids: bool = True) -> dict[str, torch.Tensor]:
    """SD-1.x keeps transformers' CLIPTextModel as it is, under `cond_stage_model.transformer.` (prefix
    added here): `cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight`, ...
    Older files (v1-5-pruned-emaonly) also hold `...text_model.embeddings.position_ids`."""
    out = {f"cond_stage_model.transformer.{k}": v for k, v in state.items()
           if position_ids or not k.endswith("embeddings.position_ids")}
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in out)
    return out
