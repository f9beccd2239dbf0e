"""tools.clip_score (its CLIP model and the score) against transformers' CLIPModel on a tiny random checkpoint.

The checkpoint is written by transformers' own save_pretrained (the real vocabulary size so our
tokenizer's ids fit, a toy transformer, 32 px images in 8 px patches), with every weight moved off
its init; a preprocessor_config.json makes the preprocessing run at 32 px.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

from fixtures_sd import isolate_hub_cache
from tokenflow.models.checkpoint import CheckpointError
from tokenflow.media import write_png_frames
from tools.clip_score import (CLIP_MEAN, CLIP_STD, ClipConfig, ClipUnavailable, Preprocess, clip_score,
                              clip_score_or_none, load_clip, load_clip_folder, main)

PROMPTS = ["a wolf made of origami", "a photo of a red fox running through the snow at dusk, high detail"]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    # Never wait on the network: the hub path must end at the cache, and that cache is an empty
    # one of the test's own, so a machine that has ViT-L/14 cached still sees it unavailable.
    isolate_hub_cache(monkeypatch, tmp_path / "hf")


def features(out) -> torch.Tensor:
    """transformers 5.x returns a ModelOutput (projection in pooler_output), 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(transformers CLIPModel with random weights, the folder it was saved to)."""
    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, hidden_act="quick_gelu")
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, max_position_embeddings=77, **tower),
        vision_config=dict(image_size=32, patch_size=8, **tower),
        projection_dim=16,
    )
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # LayerNorms are ones/zeros at init: move every weight so each one matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
    }))
    return model, folder


@pytest.fixture(scope="module")
def ours(reference):
    return load_clip_folder(reference[1])


def random_frames(n=5, h=40, w=48, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)


def test_saved_keys_are_the_published_ones(reference):
    from safetensors import safe_open

    with safe_open(str(reference[1] / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for k in ("vision_model.pre_layrnorm.weight", "vision_model.embeddings.class_embedding",
              "text_model.final_layer_norm.bias", "visual_projection.weight", "text_projection.weight", "logit_scale"):
        assert k in keys


def test_image_features_match_transformers(reference, ours):
    ref, _ = reference
    pixels = ours.preprocess(random_frames())
    assert pixels.shape == (5, 3, 32, 32)
    with torch.no_grad():
        expected = features(ref.get_image_features(pixel_values=pixels))
        got = ours.model.image_features(pixels)
    assert got.shape == (5, 16)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_text_features_match_transformers(reference, ours):
    ref, _ = reference
    ids = ours.tokenizer(PROMPTS)
    assert ids.shape == (2, 77) and ours.tokenizer.end_id == 49407
    # OpenAI's own tokenizer pads with the end token instead of 0: the feature is the FIRST end token's.
    padded_with_end = ids[:1].clone()
    first_end = int((padded_with_end[0] == 49407).nonzero()[0])
    padded_with_end[0, first_end:] = 49407
    ids = torch.cat([ids, padded_with_end])
    with torch.no_grad():
        expected = features(ref.get_text_features(input_ids=ids))
        got = ours.model.text_features(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[2], got[0], atol=1e-5, rtol=1e-5)


def test_score_equals_cosine_of_transformers_features(reference, ours):
    ref, folder = reference
    frames = random_frames(n=5)
    with torch.no_grad():
        image = features(ref.get_image_features(pixel_values=ours.preprocess(frames)))
        text = features(ref.get_text_features(input_ids=ours.tokenizer(PROMPTS[0])))
    expected = F.cosine_similarity(image, text, dim=-1)  # [5]

    result = clip_score(frames, PROMPTS[0], model=folder, batch_size=2)  # 3 batches: 2 + 2 + 1
    assert len(result.per_frame) == 5
    np.testing.assert_allclose(result.per_frame, expected.numpy(), atol=1e-4)
    assert result.mean == pytest.approx(float(expected.mean()), abs=1e-4)
    # numpy frames and an already loaded model give the same numbers
    again = clip_score(frames.numpy(), PROMPTS[0], model=ours)
    np.testing.assert_allclose(again.per_frame, result.per_frame, atol=1e-6)


def test_score_of_a_video_folder_and_the_cli(reference, ours, tmp_path, capsys):
    _, folder = reference
    frames = random_frames(n=3, h=32, w=32, seed=1)
    write_png_frames(tmp_path / "edit", frames)  # png is lossless: the same pixels come back
    direct = clip_score(frames, PROMPTS[1], model=ours)
    from_path = clip_score(tmp_path / "edit", PROMPTS[1], model=ours)
    np.testing.assert_allclose(from_path.per_frame, direct.per_frame, atol=1e-6)

    assert main(["--video", str(tmp_path / "edit"), "--prompt", PROMPTS[1], "--clip-model", str(folder)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("mean clip score: ") and float(last.split()[3]) == pytest.approx(direct.mean, abs=1e-4)


def test_preprocess_resizes_short_side_and_centre_crops():
    p = Preprocess(size=32, crop=32)
    # already the crop size: no resampling, only the normalisation
    frames = random_frames(n=2, h=32, w=32)
    x = frames.permute(0, 3, 1, 2).float() / 255
    expected = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(p(frames), expected)
    # a wide frame whose centre strip is a flat colour and whose edges differ: the crop keeps the centre only
    wide = torch.zeros(1, 64, 256, 3, dtype=torch.uint8)
    wide[:, :, 96:160] = torch.tensor([200, 100, 50], dtype=torch.uint8)  # 64 px wide centre -> 32 px after x0.5
    out = p(wide)
    assert out.shape == (1, 3, 32, 32)
    colour = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out[0, :, :, 8:24].mean(dim=(1, 2)), colour, atol=1e-3, rtol=0)  # away from the ringing
    # the long side keeps the aspect: a tall 96x48 frame becomes 64x32 before the crop (no error, 32x32 out)
    assert p(random_frames(n=1, h=96, w=48)).shape == (1, 3, 32, 32)


def test_preprocess_matches_transformers_image_processor_within_rounding():
    from transformers import CLIPImageProcessor

    frames = random_frames(n=2, h=60, w=90, seed=3)
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    expected = proc(images=list(frames.numpy()), return_tensors="pt")["pixel_values"]
    got = Preprocess(size=32, crop=32)(frames)
    # Different resampling code (PIL vs torch antialiased bicubic): agree to a few 8-bit levels.
    diff = (got - expected).abs() * torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255  # in 8-bit levels
    assert diff.mean() < 1.0 and diff.max() < 6


def test_old_config_with_config_dicts_and_defaults():
    d = {
        "projection_dim": 768,
        "text_config": {"hidden_size": 512},  # overridden by text_config_dict, as transformers did
        "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12},
        "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                               "num_hidden_layers": 24, "patch_size": 14},
    }
    cfg = ClipConfig.from_transformers_config(d)
    assert (cfg.text.width, cfg.text.heads, cfg.text.layers, cfg.text.act, cfg.text.max_positions) == (768, 12, 12, "quick_gelu", 77)
    assert (cfg.vision.width, cfg.vision.layers, cfg.vision.patch_size, cfg.vision.image_size) == (1024, 24, 14, 224)
    assert cfg.vision.num_patches == 256 and cfg.projection_dim == 768
    with pytest.raises(ValueError, match="not a transformers CLIPConfig"):
        ClipConfig.from_transformers_config({"hidden_size": 768})


def test_tokenizer_files_in_the_folder_are_used(reference, tmp_path):
    _, folder = reference
    local = tmp_path / "clip_with_tokenizer"
    local.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (local / name).symlink_to(folder / name)
    # A byte-level vocabulary without merges: every letter is its own token, unlike the real BPE.
    from clip_text.tokenizer import byte_to_char

    chars = list(byte_to_char().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (local / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (local / "merges.txt").write_text("#version: 0.2\n")
    clip = load_clip(local)
    assert clip.tokenizer.vocab_size == 514 and clip.tokenizer.end_id == 513
    letters = [tokens.index(t) for t in ("w", "o", "l", "f</w>")]
    assert clip.tokenizer("wolf")[0, :6].tolist() == [512, *letters, 513]
    assert np.isfinite(clip_score(random_frames(n=1), "wolf", model=clip).mean)


def test_unavailable_hub_id_says_what_to_provide(capsys):
    with pytest.raises(ClipUnavailable) as err:
        load_clip("openai/clip-vit-large-patch14")
    message = str(err.value)
    assert "openai/clip-vit-large-patch14" in message
    assert "local folder path" in message and "CLIPModel" in message and "safetensors" in message
    assert "network access" in message

    assert clip_score_or_none(random_frames(n=1), "a wolf") is None
    assert capsys.readouterr().out.startswith("CLIP score skipped: ")


def test_cli_fails_naming_clip_model_when_unavailable(tmp_path, capsys):
    write_png_frames(tmp_path / "edit", random_frames(n=2, h=32, w=32))
    assert main(["--video", str(tmp_path / "edit"), "--prompt", "a wolf", "--clip-model", "someone/not-cached-clip"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("error: no CLIP score: CLIP weights 'someone/not-cached-clip' are not available")
    assert err.strip().endswith("Pass that folder with --clip-model PATH.")


def test_missing_or_incomplete_local_folder(reference, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir/clip: no such folder"):
        load_clip(tmp_path / "no_such_dir" / "clip")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors: missing"):
        load_clip(empty)
    (empty / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle"):
        load_clip(empty)


def test_wrong_weights_are_named(reference, tmp_path):
    _, folder = reference
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 3  # the file holds 2
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "model.safetensors").symlink_to(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing key\(s\): vision_model.encoder.layers.2"):
        load_clip(broken)


def test_bad_frames_and_prompt(ours, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\].*\(4, 32, 32\)"):
        clip_score(torch.zeros(4, 32, 32, dtype=torch.uint8), "a wolf", model=ours)
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\].*\(0, 32, 32, 3\)"):
        clip_score(torch.zeros(0, 32, 32, 3, dtype=torch.uint8), "a wolf", model=ours)
    with pytest.raises(ValueError, match="uint8.*float32"):
        clip_score(torch.zeros(1, 32, 32, 3), "a wolf", model=ours)
    with pytest.raises(ValueError, match="prompt"):
        clip_score(random_frames(n=1), "  ", model=ours)
    with pytest.raises(FileNotFoundError):
        clip_score(tmp_path / "no_such_video.mp4", "a wolf", model=ours)
    assert main(["--video", str(tmp_path / "no_such_video.mp4"), "--prompt", "a wolf"]) == 2
    assert "no_such_video.mp4" in capsys.readouterr().err


def test_vit_l14_layout_matches_transformers_on_meta():
    """The real model's size, built on meta only: same names and shapes as transformers' CLIPModel."""
    tcfg = CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                           patch_size=14, image_size=224),
        projection_dim=768,
    )
    from tools.clip_score import ClipModel

    with torch.device("meta"):
        ref = CLIPModel(tcfg)
        model = ClipModel(ClipConfig.from_transformers_config(tcfg.to_dict()))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == ref_shapes
    assert sum(v.numel() for v in model.parameters()) == 427_616_513  # openai/clip-vit-large-patch14
    # one transformer in the project: both towers are clip_text's stack of blocks, only the mask differs
    from clip_text.model import Encoder

    assert type(model.vision_model.encoder) is Encoder and not model.vision_model.encoder.causal
    assert type(model.text_model.encoder) is Encoder and model.text_model.encoder.causal
