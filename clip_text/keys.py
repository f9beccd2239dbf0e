"""Key names of the text encoder in the files SD-1.5 and SD-2.x ship as, mapped onto the model's names.

The model's names are the published transformers ones (`text_model.*`). Other spellings:
  - transformers 5.x `save_pretrained` writes the same tensors without the `text_model.` prefix;
  - an SD-2.x ldm file holds OpenCLIP's text tower under `cond_stage_model.model.` (the caller strips
    that prefix), with q, k, v fused into one `in_proj` and all 24 blocks;
  - an SD-1.x ldm file holds transformers' CLIPTextModel as it is, under `cond_stage_model.transformer.`
    (`LDM_SD1_PREFIX`): stripping the prefix leaves the published names (older files add position_ids).

Unknown keys are passed through unchanged, so the strict loader names them instead of this file
silently dropping them. Only keys known to be unused are listed, by name, for the loader to ignore.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from tokenflow.models.checkpoint import CheckpointError

LDM_SD2_PREFIX = "cond_stage_model.model."  # OpenCLIP ViT-H/14 text tower (SD-2.x)
LDM_SD1_PREFIX = "cond_stage_model.transformer."  # transformers CLIPTextModel, OpenAI ViT-L/14 (SD-1.x)

# In the published text_encoder/model.safetensors; recomputed on the fly by the model.
IGNORED_KEYS = ("text_model.embeddings.position_ids",)

# Top-level modules of transformers' CLIPTextTransformer: the keys that lack `text_model.` when
# transformers 5.x wrote the file. Anything else (e.g. a projection head) keeps its name and is reported.
TRANSFORMER_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")

# OpenCLIP names -> transformers names, inside one block (`transformer.resblocks.N.` -> `...layers.N.`).
BLOCK_RENAMES = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
TOP_RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",  # a bare [77, W] parameter
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# The CLIP head of the text tower, which SD-2 never uses (it reads per-token features, not the pooled one).
LDM_UNUSED_TOP = ("text_projection", "logit_scale")
RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


def normalise_transformers_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give transformers-5.x keys (no `text_model.` prefix) their published names; others unchanged."""
    return {
        ("text_model." + k if k.startswith(TRANSFORMER_ROOTS) else k): v for k, v in state.items()
    }


def ldm_unused_keys(state: Mapping[str, torch.Tensor], layers: int = 23) -> list[str]:
    """Keys of an OpenCLIP text tower (prefix stripped) that SD-2 deliberately does not use.

    Blocks >= `layers` (the 24th: SD-2 reads the penultimate block), `text_projection`, `logit_scale`.
    """
    unused = []
    for k in state:
        m = RESBLOCK.match(k)
        if k in LDM_UNUSED_TOP or (m and int(m.group(1)) >= layers):
            unused.append(k)
    return unused


def ldm_to_transformers(
    state: Mapping[str, torch.Tensor], layers: int = 23, *, source: str = "cond_stage_model.model.*",
) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower (with `cond_stage_model.model.` already stripped) -> published transformers keys.

    Blocks < `layers` are renamed and their fused `in_proj` split into q, k, v. The unused keys
    (see `ldm_unused_keys`) and any unknown key keep their names: give the first to the loader's
    ignore list, and let it report the second. `source` (the file) starts the one error raised here.
    """
    out: dict[str, torch.Tensor] = {}
    unused = set(ldm_unused_keys(state, layers))
    for k, v in state.items():
        m = RESBLOCK.match(k)
        if k in unused or not (k in TOP_RENAMES or m):
            out[k] = v
        elif k in TOP_RENAMES:
            out[TOP_RENAMES[k]] = v
        else:
            n, rest = m.group(1), m.group(2)
            block = f"text_model.encoder.layers.{n}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                if v.shape[0] % 3:
                    raise CheckpointError(
                        f"{source}: {k}: fused q,k,v of shape {tuple(v.shape)}; the first dimension must be 3 x width"
                    )
                kind = "weight" if rest.endswith("weight") else "bias"
                # in_proj stacks [q; k; v] along the output dimension: [3W, W] -> three [W, W]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[f"{block}self_attn.{name}.{kind}"] = part
            elif rest in BLOCK_RENAMES:
                out[block + BLOCK_RENAMES[rest]] = v
            else:
                out[k] = v  # an unknown tensor inside a block: keep it so the loader names it
    return out
