"""Original (lllyasviel/ControlNet, `cldm`) single-file ControlNet keys -> the diffusers names our
ControlNet carries.

An original file holds `control_model.*`: the UNet encoder's own ldm names (`time_embed`,
`input_blocks.n`, `middle_block.n`; renamed as unet/keys.py renames them) and three of its own:
- `input_hint_block.{0,2,...,14}`: the conditioning embedding as one Sequential of convs with SiLUs
  at the odd indices: 0 is conv_in, 2..12 are blocks.0..5, 14 is conv_out (for the four widths
  16, 32, 96, 256: 1 + 6 + 1 convs);
- `zero_convs.N.0`: the 1x1 zero conv of skip connection N (controlnet_down_blocks.N);
- `middle_block_out.0`: the mid block's zero conv (controlnet_mid_block).

Also reads what the shapes tell about the file (its family, its condition's channels) before any
weight is read.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from torch import Tensor

from .keys import ldm_to_diffusers as unet_ldm_to_diffusers
from .keys import uses_linear_projection
from .model import UNetConfig

PREFIX = "control_model."
HINT = "input_hint_block"


def hint_names(n_convs: int) -> dict[str, str]:
    """'input_hint_block.2' -> 'controlnet_cond_embedding.blocks.0', for a hint block of n_convs convs."""
    names = {f"{HINT}.0": "controlnet_cond_embedding.conv_in",
             f"{HINT}.{2 * (n_convs - 1)}": "controlnet_cond_embedding.conv_out"}
    for j in range(n_convs - 2):
        names[f"{HINT}.{2 * (j + 1)}"] = f"controlnet_cond_embedding.blocks.{j}"
    return names


def hint_conv_count(keys) -> int:
    """How many convs the file's input_hint_block holds (every other Sequential index)."""
    idx = {int(m.group(1)) for k in keys if (m := re.match(rf"{HINT}\.(\d+)\.weight$", k))}
    return len(idx)


def ldm_to_diffusers(state: dict[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """Rename an original ControlNet state dict (prefix `control_model.` already stripped). Keys that
    match no rule are kept as they are, so the strict loader reports them."""
    hint = hint_names(hint_conv_count(state))
    own, encoder = {}, {}
    for key, tensor in state.items():
        head, _, param = key.rpartition(".")  # 'zero_convs.3.0', 'weight'
        if head in hint:
            own[f"{hint[head]}.{param}"] = tensor
        elif m := re.fullmatch(r"zero_convs\.(\d+)\.0", head):
            own[f"controlnet_down_blocks.{m.group(1)}.{param}"] = tensor
        elif head == "middle_block_out.0":
            own[f"controlnet_mid_block.{param}"] = tensor
        else:
            encoder[key] = tensor
    return {**unet_ldm_to_diffusers(encoder, cfg), **own}


def conditioning_channels(shapes: Mapping[str, Sequence[int]], source: str) -> int:
    """The condition image's channels: input_hint_block.0.weight is [16, channels, 3, 3]."""
    key = f"{HINT}.0.weight"
    if key not in shapes:
        raise ValueError(f"{source}: no {key!r}; not an original-layout ControlNet")
    return int(shapes[key][1])


def family(shapes: Mapping[str, Sequence[int]], source: str) -> tuple[bool, int]:
    """(Linear proj_in/proj_out?, cross-attention width) of an original ControlNet, from shapes alone:
    SD-1.x (False, 768), SD-2.x (True, 1024)."""
    ctx = next((k for k in shapes if k.endswith("attn2.to_k.weight")), None)
    if ctx is None:
        raise ValueError(f"{source}: no cross-attention weights (*.attn2.to_k.weight); not an SD ControlNet")
    return uses_linear_projection(shapes, source), int(shapes[ctx][1])
