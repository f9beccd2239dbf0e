"""Test-only: write a diffusers UNet state dict in the ldm single-file layout.

Written as explicit loops over the architecture (not as unet/keys.py run backwards), so a fixture
made here is independent evidence for our ldm reader; diffusers' own single-file loader checks it.
"""

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _move(state, out, src_prefix, dst_prefix, resnet=False):
    for key in [k for k in state if k.startswith(src_prefix + ".")]:
        rest = key[len(src_prefix) + 1:]
        if resnet:
            head, _, tail = rest.partition(".")
            rest = RESNET[head] + "." + tail
        out[dst_prefix + "." + rest] = state.pop(key)


def diffusers_unet_to_ldm(state, levels, layers_per_block, attention_levels):
    state, out = dict(state), {}
    _move(state, out, "conv_in", "input_blocks.0.0")
    _move(state, out, "time_embedding.linear_1", "time_embed.0")
    _move(state, out, "time_embedding.linear_2", "time_embed.2")
    _move(state, out, "conv_norm_out", "out.0")
    _move(state, out, "conv_out", "out.2")
    idx = 1
    for i in range(levels):
        for j in range(layers_per_block):
            _move(state, out, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", resnet=True)
            if attention_levels[i]:
                _move(state, out, f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1")
            idx += 1
        if i < levels - 1:
            _move(state, out, f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{idx}.0.op")
            idx += 1
    _move(state, out, "mid_block.resnets.0", "middle_block.0", resnet=True)
    _move(state, out, "mid_block.attentions.0", "middle_block.1")
    _move(state, out, "mid_block.resnets.1", "middle_block.2", resnet=True)
    idx = 0
    for i in range(levels):
        has_attn = attention_levels[levels - 1 - i]
        for j in range(layers_per_block + 1):
            _move(state, out, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", resnet=True)
            if has_attn:
                _move(state, out, f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1")
            if j == layers_per_block and i < levels - 1:
                _move(state, out, f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{idx}.{2 if has_attn else 1}.conv")
            idx += 1
    assert not state, f"unconverted keys: {sorted(state)[:5]}"
    return {"model.diffusion_model." + k: v for k, v in out.items()}
