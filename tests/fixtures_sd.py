"""Test-only: a tiny SD-2.1-family (or, with kind="sd15", SD-1.5-family) checkpoint written by the
reference libraries, in both layouts.

- `write_diffusers_folder(root)`: diffusers `UNet2DConditionModel` and `AutoencoderKL`, transformers
  `CLIPTextModel` (renamed to the PUBLISHED key layout: `text_model.` prefix and position_ids, which
  today's transformers no longer writes), a tokenizer/ folder, scheduler config, model_index.json.
- `write_ldm_file(path, refs)`: the same weights as one ldm `.safetensors`, written by the test-only
  writers (tests/ldm_writer_*.py), plus the 12 schedule buffers an ldm file carries.
- `compare_with_references(models, refs)`: what `load_models` gave against the reference models.
- `isolate_hub_cache(monkeypatch, root)`: an empty, offline Hugging Face cache under `root`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from tokenflow.models.checkpoint import assign_strict

from ldm_writer_text import transformers_text_to_ldm, transformers_text_to_ldm_sd1
from ldm_writer_unet import diffusers_unet_to_ldm
from ldm_writer_vae import diffusers_vae_to_ldm
from test_tokenizer import load_open_clip_tokenizer_module, write_folder

SCHEDULER = dict(
    _class_name="DDIMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, num_train_timesteps=1000, prediction_type="epsilon", set_alpha_to_one=False,
    steps_offset=1, skip_prk_steps=True,
)


@dataclass
class References:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text: torch.nn.Module


def perturb(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():  # norms and biases away from their defaults, so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def fill_on_meta(model_cls, cfg, state):
    """Our model built on the meta device and filled strictly from `state`, as the loader does."""
    with torch.device("meta"):
        model = model_cls(cfg)
    return assign_strict(model, state, source="test").eval()


# SD-1.5's differences from SD-2.1, at the tiny widths (sd15-and-released-code.md): 8 heads at every
# level (diffusers' attention_head_dim=8 is the head COUNT), 1x1-conv proj_in/proj_out
# (use_linear_projection false), a quick_gelu text tower with 64-wide heads, narrower than the SD-2 one's.
SD15_UNET = dict(attention_head_dim=8, use_linear_projection=False, cross_attention_dim=128)
SD15_TEXT = dict(hidden_size=128, num_attention_heads=2, num_hidden_layers=2, intermediate_size=256, hidden_act="quick_gelu")
# SD-1.5's scheduler/scheduler_config.json as published: PNDM with the DDIM schedule's numbers, no prediction_type.
SD15_SCHEDULER = dict(
    _class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None,
    clip_sample=False,
)
# SD-1.5's tokenizer/special_tokens_map.json: transformers' CLIPTokenizer padding with the end token.
SD15_SPECIAL_TOKENS = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                           unk_token="<|endoftext|>")


def build_references(upcast: bool = False, kind: str = "sd2") -> References:
    import diffusers
    import transformers

    sd15 = kind == "sd15"
    torch.manual_seed(0)
    unet_shape = SD15_UNET if sd15 else dict(attention_head_dim=[1, 1, 2, 2], use_linear_projection=True, cross_attention_dim=64)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(64, 64, 128, 128), **unet_shape,
        upcast_attention=upcast, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=64,
    )
    text_shape = SD15_TEXT if sd15 else dict(
        hidden_size=64, num_attention_heads=1, num_hidden_layers=2, intermediate_size=128, hidden_act="gelu")
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, projection_dim=32, **text_shape,
    ))
    return References(perturb(unet, 1), perturb(vae, 2), perturb(text, 3))


def published_text_state(text) -> dict[str, torch.Tensor]:
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in text.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return state


def is_sd15(refs: References) -> bool:
    return not refs.unet.config.use_linear_projection


def write_tokenizer_folder(folder: Path, sd15: bool) -> Path:
    """vocab.json + merges.txt from OpenCLIP's BPE; for SD-1.5 also its special_tokens_map.json (pad <|endoftext|>)."""
    write_folder(load_open_clip_tokenizer_module().SimpleTokenizer(), folder)
    if sd15:
        (folder / "special_tokens_map.json").write_text(json.dumps(SD15_SPECIAL_TOKENS))
        (folder / "tokenizer_config.json").write_text(json.dumps(dict(
            SD15_SPECIAL_TOKENS, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer")))
    return folder


def write_diffusers_folder(root: Path, refs: References, prediction_type: str = "epsilon") -> Path:
    """SD-1.5 folders get SD-1.5's published scheduler config (no prediction_type: epsilon) and tokenizer files."""
    sd15 = is_sd15(refs)
    refs.unet.save_pretrained(root / "unet")
    refs.vae.save_pretrained(root / "vae")
    (root / "text_encoder").mkdir(parents=True)
    refs.text.config.to_json_file(root / "text_encoder" / "config.json")
    save_file({k: v.contiguous() for k, v in published_text_state(refs.text).items()}, root / "text_encoder" / "model.safetensors")
    write_tokenizer_folder(root / "tokenizer", sd15)
    (root / "scheduler").mkdir()
    scheduler = SD15_SCHEDULER if sd15 else dict(SCHEDULER, prediction_type=prediction_type)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


def write_ldm_file(path: Path, refs: References, position_ids: bool = True) -> Path:
    """SD-2.x: OpenCLIP's text tower under cond_stage_model.model.; SD-1.5: transformers' CLIPTextModel
    under cond_stage_model.transformer. (`position_ids`: as older SD-1.5 files hold them)."""
    state = diffusers_unet_to_ldm(refs.unet.state_dict(), 4, 2, (True, True, True, False))
    state.update({f"first_stage_model.{k}": v for k, v in diffusers_vae_to_ldm(refs.vae.state_dict()).items()})
    if is_sd15(refs):
        state.update(transformers_text_to_ldm_sd1(published_text_state(refs.text), position_ids=position_ids))
    else:
        text = transformers_text_to_ldm(published_text_state(refs.text))
        state.update({f"cond_stage_model.model.{k}": v for k, v in text.items()})
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                 "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                 "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"):
        state[name] = betas.clone()
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def compare_with_references(models, refs: References) -> dict[str, float]:
    """max abs differences: UNet output, VAE posterior mean and log-variance, decoded image, text hidden states."""
    torch.manual_seed(5)
    width = refs.unet.config.cross_attention_dim
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 77, width), torch.tensor([1, 901])
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    ids = models.tokenizer(["a wolf in the snow", "a marble sculpture!"])
    with torch.no_grad():
        unet = (models.unet(x, t, ctx) - refs.unet(x, t, ctx).sample).abs().max().item()
        mean, logvar = models.vae.encode(images)
        post = refs.vae.encode(images).latent_dist
        vae_mean = (mean - post.mean).abs().max().item()
        vae_logvar = (logvar - post.logvar).abs().max().item()
        decoded = (models.vae.decode(mean) - refs.vae.decode(post.mean).sample).abs().max().item()
        text = (models.text_encoder(ids) - refs.text(input_ids=ids).last_hidden_state).abs().max().item()
    return dict(unet=unet, vae_mean=vae_mean, vae_logvar=vae_logvar, vae_decoded=decoded, text=text)


def isolate_hub_cache(monkeypatch, root: Path) -> Path:
    """An empty Hugging Face cache under `root` (HF_HOME=root, HF_HUB_CACHE=root/hub), offline, so
    weights cached on the machine running the tests cannot answer. huggingface_hub reads its
    environment once, at import: its constants are set as well as the variables."""
    import huggingface_hub.constants as c

    cache = root / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    for name, value in (("HF_HOME", root), ("HF_HUB_CACHE", cache), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(c, "HF_HOME", str(root))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache
