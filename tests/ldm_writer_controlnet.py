"""Test-only: write a diffusers ControlNetModel state dict in the original single-file layout
(lllyasviel/ControlNet's `control_model.*` keys).

Written as explicit loops over the architecture (not as unet/controlnet_keys.py run backwards), so a
file made here is independent evidence for our reader: the encoder goes through the UNet's test
writer (ldm_writer_unet.py), the ControlNet's own layers are placed by hand:
input_hint_block.{0,2,...,14} (convs at even Sequential indices, SiLUs between), zero_convs.N.0,
middle_block_out.0.
"""

from ldm_writer_unet import diffusers_unet_to_ldm

UNET_PREFIX = "model.diffusion_model."


def diffusers_controlnet_to_ldm(state, levels, layers_per_block, attention_levels):
    state, out = dict(state), {}
    embedding = ["conv_in"] + [f"blocks.{j}" for j in range(6)] + ["conv_out"]
    for n, name in enumerate(embedding):
        for param in ("weight", "bias"):
            out[f"input_hint_block.{2 * n}.{param}"] = state.pop(f"controlnet_cond_embedding.{name}.{param}")
    skips = 1 + levels * layers_per_block + (levels - 1)  # conv_in, resnets, downsamplers
    for n in range(skips):
        for param in ("weight", "bias"):
            out[f"zero_convs.{n}.0.{param}"] = state.pop(f"controlnet_down_blocks.{n}.{param}")
    for param in ("weight", "bias"):
        out[f"middle_block_out.0.{param}"] = state.pop(f"controlnet_mid_block.{param}")
    encoder = diffusers_unet_to_ldm(state, levels, layers_per_block, attention_levels)
    out.update({k[len(UNET_PREFIX):]: v for k, v in encoder.items()})
    return {"control_model." + k: v for k, v in out.items()}
