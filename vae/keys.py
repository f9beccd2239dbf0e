"""VAE key layouts -> today's diffusers names (the names our modules carry).

Two older layouts are accepted:
- diffusers folders written in late 2022 (the published SD-2.1 ones) name the mid-block attention
  `query`, `key`, `value`, `proj_attn`, some as 1x1 convolutions [C, C, 1, 1];
- ldm single files (`first_stage_model.*`, prefix stripped by the caller): `down.N.block.M`,
  `mid.block_1/attn_1/block_2`, `nin_shortcut`, `norm_out`, attention `norm,q,k,v,proj_out` as 1x1
  convolutions (older conversions: the 2022 names above), and decoder `up.N` numbered from the
  DEEPEST level (the reverse of `up_blocks`).
Unknown keys pass through unchanged, so the strict loader reports them by name.
"""

from __future__ import annotations

import re

from torch import Tensor

IGNORED_KEYS: tuple[str, ...] = ()

OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0",
                 **OLD_ATTENTION}  # some older conversions wrote the 2022 diffusers names inside attn_1
LDM_RESNET = {"nin_shortcut": "conv_shortcut"}


def _linear(t: Tensor) -> Tensor:
    """[C, C, 1, 1] 1x1-conv weight -> [C, C] linear weight (biases and [C, C] pass through)."""
    return t[:, :, 0, 0] if t.ndim == 4 else t


def normalise_diffusers_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, t in state.items():
        m = re.match(r"^(.*mid_block\.attentions\.0)\.(query|key|value|proj_attn|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", key)
        if m:
            key = f"{m.group(1)}.{OLD_ATTENTION.get(m.group(2), m.group(2))}.{m.group(3)}"
            t = _linear(t)
        out[key] = t
    return out


def ldm_to_diffusers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    levels = 1 + max((int(k.split(".")[2]) for k in state if k.startswith("encoder.down.")), default=-1)
    out = {}
    for key, t in state.items():
        new = key
        if m := re.match(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(block|downsample|upsample)\.(.*)$", key):
            part, way, n, kind, rest = m.groups()
            # ldm numbers decoder levels from the deepest; diffusers' up_blocks start there
            level = int(n) if way == "down" else levels - 1 - int(n)
            blocks = "down_blocks" if way == "down" else "up_blocks"
            if kind == "block":
                j, _, rest = rest.partition(".")
                head, _, tail = rest.partition(".")
                new = f"{part}.{blocks}.{level}.resnets.{j}.{LDM_RESNET.get(head, head)}.{tail}"
            else:
                new = f"{part}.{blocks}.{level}.{kind}rs.0.{rest}"
        elif m := re.match(r"^(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)$", key):
            part, which, rest = m.groups()
            head, _, tail = rest.partition(".")
            if which == "attn_1":
                new = f"{part}.mid_block.attentions.0.{LDM_ATTENTION.get(head, head)}.{tail}"
                t = _linear(t) if head != "norm" else t
            else:
                new = f"{part}.mid_block.resnets.{0 if which == 'block_1' else 1}.{LDM_RESNET.get(head, head)}.{tail}"
        elif m := re.match(r"^(encoder|decoder)\.norm_out\.(.*)$", key):
            new = f"{m.group(1)}.conv_norm_out.{m.group(2)}"
        out[new] = t
    return out
