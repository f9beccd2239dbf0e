"""ldm (CompVis/Stability single-file) UNet keys -> the diffusers names our modules carry.

The ldm UNet is three flat lists: `input_blocks.n`, `middle_block.n`, `output_blocks.n`, where each
entry is a small sequential [resnet, attention?, down/upsample?]. Which entry is which follows from
the config: per level there are `layers_per_block` entries (+1 downsample entry between levels) on
the way down, and `layers_per_block + 1` entries on the way up. Inside a resnet, ldm numbers its
sequential layers (in_layers.0 = norm1, in_layers.2 = conv1, ...); attention internals share names.

Also infers a UNetConfig from an ldm state dict's shapes (an ldm file carries no config).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from torch import Tensor

from .model import SD1_HEADS, SD2_HEAD_DIM, UNetConfig

PREFIX = "model.diffusion_model."

RESNET_RENAMES = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
TOP_RENAMES = {
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
}


def _resnet(rest: str) -> str:
    for old, new in RESNET_RENAMES.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def ldm_block_names(cfg: UNetConfig) -> dict[str, str]:
    """'input_blocks.4.1' -> 'down_blocks.1.attentions.0', etc., for every ldm sub-block."""
    names = {}
    n_levels, per = len(cfg.block_out_channels), cfg.layers_per_block
    n = 1  # input_blocks.0 is conv_in
    for i in range(n_levels):
        for j in range(per):
            names[f"input_blocks.{n}.0"] = f"down_blocks.{i}.resnets.{j}"
            if cfg.attention_levels[i]:
                names[f"input_blocks.{n}.1"] = f"down_blocks.{i}.attentions.{j}"
            n += 1
        if i < n_levels - 1:
            names[f"input_blocks.{n}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
            n += 1
    names["middle_block.0"] = "mid_block.resnets.0"
    names["middle_block.1"] = "mid_block.attentions.0"
    names["middle_block.2"] = "mid_block.resnets.1"
    n = 0
    for i in range(n_levels):
        level = n_levels - 1 - i
        for j in range(per + 1):
            names[f"output_blocks.{n}.0"] = f"up_blocks.{i}.resnets.{j}"
            sub = 1
            if cfg.attention_levels[level]:
                names[f"output_blocks.{n}.1"] = f"up_blocks.{i}.attentions.{j}"
                sub = 2
            if j == per and level != 0:
                names[f"output_blocks.{n}.{sub}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
            n += 1
    return names


def ldm_to_diffusers(state: dict[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """Rename an ldm UNet state dict (prefix `model.diffusion_model.` already stripped).
    Keys that match no rule are kept as they are, so the strict loader reports them."""
    blocks = ldm_block_names(cfg)
    pattern = re.compile(r"^((?:input_blocks|output_blocks)\.\d+\.\d+(?:\.op|\.conv)?|middle_block\.\d+)\.(.+)$")
    out = {}
    for key, tensor in state.items():
        new = key
        for old, repl in TOP_RENAMES.items():
            if key.startswith(old + "."):
                new = repl + key[len(old):]
                break
        else:
            m = pattern.match(key)
            if m:
                block, rest = m.group(1), m.group(2)  # 'output_blocks.2.1.conv', 'weight'
                if block in blocks:
                    target = blocks[block]
                    new = f"{target}.{_resnet(rest) if '.resnets.' in target else rest}"
        out[new] = tensor
    return out


def _shape(state: dict[str, Tensor], key: str, source: str) -> tuple[int, ...]:
    """The shape of `state[key]`, or a ValueError naming the source and the key an SD UNet must have."""
    if key not in state:
        raise ValueError(f"{source}: no {key!r}; not a complete SD UNet (ldm layout)")
    return tuple(state[key].shape)


def config_from_ldm(
    state: dict[str, Tensor], *, upcast_attention: bool, sample_size: int, source: str = PREFIX + "*",
) -> UNetConfig:
    """The architecture an ldm UNet state dict describes (prefix stripped), read off tensor shapes.

    The head count is in no shape; the original configs set it by family, and the family shows in
    proj_in's shape: a 1x1 conv [C, C, 1, 1] is SD-1.x (`num_heads: 8` at every level), Linear [C, C]
    is SD-2.x (`num_head_channels: 64`). `source` names the file in errors: a state dict
    that lacks what the inference reads gives a ValueError naming the key, never a bare KeyError."""
    in_ch = _shape(state, "input_blocks.0.0.weight", source)[1]
    out_ch = _shape(state, "out.2.weight", source)[0]
    n_inputs = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("input_blocks."))
    # entries of a level: resnets; levels are separated by one downsample entry ('.0.op')
    down_entries = sorted({int(k.split(".")[1]) for k in state if re.match(r"input_blocks\.\d+\.0\.op\.", k)})
    n_levels = len(down_entries) + 1
    per, odd = divmod(n_inputs - 1 - len(down_entries), n_levels)
    if per < 1 or odd:
        raise ValueError(
            f"{source}: {n_inputs - 1} input_blocks after conv_in with {len(down_entries)} downsample(s) "
            f"do not split into {n_levels} levels of equal depth; not an SD UNet (ldm layout)"
        )
    channels, attn = [], []
    n = 1
    for i in range(n_levels):
        channels.append(_shape(state, f"input_blocks.{n}.0.out_layers.3.weight", source)[0])
        attn.append(f"input_blocks.{n}.1.proj_in.weight" in state)
        n += per + (1 if i < n_levels - 1 else 0)
    ctx_key = next((k for k in state if k.endswith("attn2.to_k.weight")), None)
    if ctx_key is None:
        raise ValueError(f"{source}: no cross-attention weights (*.attn2.to_k.weight); not a text-conditioned SD UNet")
    linear = uses_linear_projection({k: v.shape for k, v in state.items()}, source)
    heads = tuple(max(c // SD2_HEAD_DIM, 1) for c in channels) if linear else (SD1_HEADS,) * n_levels
    return UNetConfig(
        in_channels=in_ch, out_channels=out_ch, block_out_channels=tuple(channels), attention_levels=tuple(attn),
        layers_per_block=per, heads=heads, cross_attention_dim=state[ctx_key].shape[1],
        use_linear_projection=linear, upcast_attention=upcast_attention, sample_size=sample_size,
    )


def uses_linear_projection(shapes: Mapping[str, Sequence[int]], source: str = PREFIX + "*") -> bool:
    """True for Linear proj_in weights [C, C] (SD-2.x), False for 1x1 convs [C, C, 1, 1] (SD-1.x).
    `shapes`: key -> shape, of tensors or of a safetensors header (no weights need be read)."""
    dims = {tuple(shape[2:]) for k, shape in shapes.items() if k.endswith((".proj_in.weight", ".proj_out.weight"))}
    if dims == {()}:
        return True
    if dims == {(1, 1)}:
        return False
    found = sorted(dims) if dims else "no *.proj_in.weight at all"
    raise ValueError(
        f"{source}: proj_in/proj_out weights must be all Linear [C, C] (SD-2.x) or all 1x1 convs [C, C, 1, 1] "
        f"(SD-1.x); trailing dims found: {found}"
    )
