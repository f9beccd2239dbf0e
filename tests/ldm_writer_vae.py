"""Test-only: a diffusers AutoencoderKL state dict in the ldm layout (no prefix), written as explicit
loops over the architecture, independent of vae/keys.py; diffusers' single-file loader checks it."""


def diffusers_vae_to_ldm(state):
    state, out = dict(state), {}

    def move(src, dst, conv_attention=False):
        for key in [k for k in state if k == src or k.startswith(src + ".")]:
            t = state.pop(key)
            if conv_attention and t.ndim == 2:
                t = t[:, :, None, None]  # ldm stores the attention projections as 1x1 convolutions
            out[dst + key[len(src):]] = t

    def resnet(src, dst):
        for name in ("norm1", "conv1", "norm2", "conv2"):
            move(f"{src}.{name}", f"{dst}.{name}")
        move(f"{src}.conv_shortcut", f"{dst}.nin_shortcut")

    def mid(part):
        resnet(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1")
        resnet(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2")
        a = f"{part}.mid_block.attentions.0"
        move(f"{a}.group_norm", f"{part}.mid.attn_1.norm")
        for ours, theirs in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            move(f"{a}.{ours}", f"{part}.mid.attn_1.{theirs}", conv_attention=True)

    levels = len({k.split(".")[2] for k in state if k.startswith("encoder.down_blocks.")})
    for part in ("encoder", "decoder"):
        move(f"{part}.conv_in", f"{part}.conv_in")
        move(f"{part}.conv_out", f"{part}.conv_out")
        move(f"{part}.conv_norm_out", f"{part}.norm_out")
        mid(part)
    for i in range(levels):
        for j in range(8):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{levels - 1 - i}.block.{j}")
        move(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
        move(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{levels - 1 - i}.upsample.conv")
    move("quant_conv", "quant_conv")
    move("post_quant_conv", "post_quant_conv")
    assert not state, f"unconverted keys: {sorted(state)[:5]}"
    return out
