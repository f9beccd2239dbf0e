"""VAE: parity with diffusers' AutoencoderKL in today's, the late-2022 and the ldm layouts; the real
config's size and keys; clear shape errors."""

import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from fixtures_sd import fill_on_meta, perturb
from ldm_writer_vae import diffusers_vae_to_ldm
from tokenflow.models.checkpoint import CheckpointError, read_safetensors, strip_prefix
from vae import VAE, VAEConfig
from vae.keys import ldm_to_diffusers, normalise_diffusers_keys

diffusers = pytest.importorskip("diffusers")
SD_BLOCKS = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, **SD_BLOCKS)
    return perturb(ref, 1)


def ours_from(state, cfg):
    return fill_on_meta(VAE, cfg, state)


def max_diffs(ours, ref):
    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        mean, logvar = ours.encode(images)
        post = ref.encode(images).latent_dist
        decoded = ours.decode(mean)
        want = ref.decode(post.mean).sample
    assert mean.shape == (2, 4, 16, 24) and decoded.shape == images.shape
    return max((mean - post.mean).abs().max(), (logvar - post.logvar).abs().max(), (decoded - want).abs().max()).item()


def test_parity_diffusers_folder_today_and_2022_layouts(reference, tmp_path):
    reference.save_pretrained(tmp_path)
    state = read_safetensors(tmp_path / "diffusion_pytorch_model.safetensors")
    cfg = VAEConfig.from_diffusers_config(dict(reference.config))
    assert max_diffs(ours_from(normalise_diffusers_keys(state), cfg), reference) <= 1e-4
    old = {}
    for k, v in state.items():  # the published 2022 names, attention as 1x1 convolutions
        for new, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f"mid_block.attentions.0.{new}." in k:
                k = k.replace(new, legacy)
                v = v[:, :, None, None] if v.ndim == 2 else v
        old[k] = v
    assert any("proj_attn" in k for k in old)
    assert max_diffs(ours_from(normalise_diffusers_keys(old), cfg), reference) <= 1e-4


def test_ldm_layout_against_diffusers_single_file(reference, tmp_path):
    reference.save_pretrained(tmp_path / "vae")
    ldm = {f"first_stage_model.{k}": v.contiguous() for k, v in diffusers_vae_to_ldm(reference.state_dict()).items()}
    save_file(ldm, tmp_path / "vae.safetensors")
    # diffusers' own single-file loader reads our fixture: the writer is not the only evidence
    theirs = diffusers.AutoencoderKL.from_single_file(str(tmp_path / "vae.safetensors"), config=str(tmp_path), subfolder="vae").eval()
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(theirs.encode(images).latent_dist.mean, reference.encode(images).latent_dist.mean, atol=1e-6)
        assert theirs.decoder.up_blocks[0].upsamplers is not None
        for k, v in reference.state_dict().items():
            assert torch.equal(theirs.state_dict()[k], v), k
    state = ldm_to_diffusers(strip_prefix(read_safetensors(tmp_path / "vae.safetensors"), "first_stage_model."))
    cfg = VAEConfig.from_state_dict(state)
    # an ldm file carries no config: the state dict gives the architecture, sample_size stays the default
    assert cfg == replace(VAEConfig.from_diffusers_config(dict(reference.config)), sample_size=512)
    assert max_diffs(ours_from(state, cfg), reference) <= 1e-4


def test_ldm_older_attention_names_and_unknown_keys(reference):
    ldm = diffusers_vae_to_ldm(reference.state_dict())
    older = {k.replace("attn_1.q.", "attn_1.query.").replace("attn_1.proj_out.", "attn_1.proj_attn."): v for k, v in ldm.items()}
    assert any("attn_1.proj_attn." in k for k in older)
    cfg = VAEConfig.from_diffusers_config(dict(reference.config))
    assert max_diffs(ours_from(ldm_to_diffusers(older), cfg), reference) <= 1e-4
    # keys the mapping does not know survive unchanged, so the strict loader names them
    odd = dict(ldm, **{"encoder.extra.weight": torch.zeros(1), "loss.logvar": torch.zeros(1)})
    renamed = ldm_to_diffusers(odd)
    assert renamed["encoder.extra.weight"] is odd["encoder.extra.weight"] and "loss.logvar" in renamed
    with pytest.raises(CheckpointError, match=r"2 unexpected key\(s\):.*encoder\.extra\.weight"):
        ours_from(renamed, cfg)


def test_config_from_state_dict_names_what_is_missing(reference):
    state = ldm_to_diffusers(diffusers_vae_to_ldm(reference.state_dict()))
    where = "v2-1.safetensors [first_stage_model.*]"
    with pytest.raises(ValueError, match=re.escape(f"{where}: no encoder levels (ldm encoder.down.N.*")):
        VAEConfig.from_state_dict({}, source=where)
    for key in ("post_quant_conv.weight", "decoder.conv_out.weight", "encoder.down_blocks.1.resnets.0.conv1.weight"):
        with pytest.raises(ValueError, match=re.escape(f"{where}: no {key!r}")):
            VAEConfig.from_state_dict({k: v for k, v in state.items() if k != key}, source=where)


def test_decode_in_slices_equals_decode_at_once():
    torch.manual_seed(0)
    vae = perturb(VAE(VAEConfig.tiny()), 3)
    z = torch.randn(3, 4, 4, 4)
    with torch.no_grad():
        whole = vae.decode(z)
        sliced = vae.decode(z, batch_size=2)  # 2 + 1
    assert whole.shape == (3, 3, 32, 32)
    assert torch.allclose(whole, sliced, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        vae.decode(z, batch_size=0)


def test_real_config_on_meta():
    with torch.device("meta"):
        ours = VAE(VAEConfig.sd21())
        ref = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
        )
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863
    assert set(ours.state_dict()) == set(ref.state_dict()) and len(ref.state_dict()) == 248
    assert ours.downsample_factor == 8 and ours.config.scaling_factor == 0.18215


def test_scaling_and_shape_errors():
    vae = VAE(VAEConfig.tiny()).eval()
    z = torch.randn(1, 4, 2, 2)
    assert torch.allclose(vae.unscale_latents(vae.scale_latents(z)), z)
    assert torch.allclose(vae.scale_latents(z), z * 0.18215)
    with pytest.raises(ValueError, match=r"multiples of 8, got \(1, 3, 65, 64\)"):
        vae.encode(torch.zeros(1, 3, 65, 64))
    with pytest.raises(ValueError, match="latents must be"):
        vae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="unsupported block types"):
        VAEConfig.from_diffusers_config({"down_block_types": ["AttnDownEncoderBlock2D"]})
    with pytest.raises(ValueError, match="shift_factor=0.0609 is not supported"):
        VAEConfig.from_diffusers_config({"shift_factor": 0.0609, "scaling_factor": 1.5305})
    with pytest.raises(ValueError, match="use_quant_conv=False"):
        VAEConfig.from_diffusers_config({"use_quant_conv": False})
