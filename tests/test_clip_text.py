"""clip_text.TextEncoder against transformers' CLIPTextModel, and its loading from both SD-2.1 layouts.

Random weights at a tiny config (the real vocabulary, a toy transformer); the real config is only
built on the meta device, to check parameter count and key names against transformers'.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from clip_text import (
    IGNORED_KEYS, TextConfig, TextEncoder, ldm_to_transformers, ldm_unused_keys, normalise_transformers_keys,
)
from ldm_writer_text import transformers_text_to_ldm
from tokenflow.models.checkpoint import CheckpointError, assign_strict, read_json, read_safetensors, strip_prefix

LDM_PREFIX = "cond_stage_model.model."


def transformers_config(cfg: TextConfig, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_positions, hidden_size=cfg.width,
        num_attention_heads=cfg.heads, num_hidden_layers=cfg.layers, intermediate_size=cfg.mlp,
        hidden_act=cfg.act, layer_norm_eps=cfg.layer_norm_eps, **extra,
    )


def build(cfg: TextConfig, state, ignore=()) -> TextEncoder:
    with torch.device("meta"):
        model = TextEncoder(cfg)
    return assign_strict(model, state, source="test", ignore=ignore).eval()


def sample_ids(batch: int = 3, seed: int = 0) -> torch.Tensor:
    """Rows like the tokenizer's: start, random ids, end, zero padding (different lengths per row)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, 77, dtype=torch.long)
    for i, n in enumerate([5, 40, 75][:batch]):
        ids[i, 0] = 49406
        ids[i, 1 : n + 1] = torch.randint(0, 49406, (n,), generator=g)
        ids[i, n + 1] = 49407
    return ids


@pytest.fixture(scope="module", params=["gelu", "quick_gelu"])
def reference(request, tmp_path_factory):
    """(our config, transformers model with random weights, its files saved by save_pretrained)."""
    torch.manual_seed(0)
    cfg = replace(TextConfig.tiny(), act=request.param)
    model = CLIPTextModel(transformers_config(cfg)).eval()
    with torch.no_grad():  # move every weight off its init (LayerNorms are ones/zeros otherwise)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    folder = tmp_path_factory.mktemp(f"text_encoder_{request.param}")
    model.save_pretrained(folder)
    return cfg, model, folder


def test_config_from_saved_transformers_config(reference):
    cfg, _, folder = reference
    assert TextConfig.from_transformers_config(read_json(folder / "config.json")) == cfg


def test_parity_with_transformers(reference):
    cfg, ref, folder = reference
    state = normalise_transformers_keys(read_safetensors(folder / "model.safetensors"))
    assert all(k.startswith("text_model.") for k in state)
    ours = build(cfg, state)
    ids = sample_ids()
    with torch.no_grad():
        want = ref(input_ids=ids).last_hidden_state
        got = ours(ids)
    assert got.shape == (3, 77, cfg.width)
    assert (got - want).abs().max().item() <= 1e-4


def test_published_layout_with_position_ids(reference):
    cfg, ref, folder = reference
    # The published SD-2.1 file: `text_model.` prefix and a position_ids tensor (normalising is a no-op).
    state = {"text_model." + k: v for k, v in read_safetensors(folder / "model.safetensors").items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state = normalise_transformers_keys(state)
    with pytest.raises(CheckpointError, match="unexpected.*position_ids"):
        build(cfg, state)
    ours = build(cfg, state, ignore=IGNORED_KEYS)
    ids = sample_ids(2, seed=1)
    with torch.no_grad():
        assert (ours(ids) - ref(input_ids=ids).last_hidden_state).abs().max().item() <= 1e-4


def test_ldm_layout(reference, tmp_path):
    cfg, ref, folder = reference
    published = normalise_transformers_keys(read_safetensors(folder / "model.safetensors"))
    ldm = transformers_text_to_ldm(published)  # cfg.layers + 1 blocks, text_projection, logit_scale
    assert f"transformer.resblocks.{cfg.layers}.attn.in_proj_weight" in ldm
    other = {"model.diffusion_model.conv_in.bias": torch.zeros(4), "first_stage_model.quant_conv.bias": torch.zeros(8)}
    save_file({**other, **{LDM_PREFIX + k: v.contiguous() for k, v in ldm.items()}}, str(tmp_path / "v2-1.safetensors"))

    tower = strip_prefix(read_safetensors(tmp_path / "v2-1.safetensors"), LDM_PREFIX)
    assert TextConfig.from_open_clip_state_dict(tower, heads=cfg.heads) == replace(cfg, act="gelu")  # OpenCLIP's
    with pytest.raises(ValueError, match="width 32 is not a multiple of 64-wide heads"):
        TextConfig.from_open_clip_state_dict(tower)
    unused = ldm_unused_keys(tower, cfg.layers)
    assert sorted(unused) == sorted(
        ["text_projection", "logit_scale"] + [k for k in tower if k.startswith(f"transformer.resblocks.{cfg.layers}.")]
    )
    state = ldm_to_transformers(tower, cfg.layers)
    with pytest.raises(CheckpointError, match="unexpected.*logit_scale"):
        build(cfg, state)
    ours = build(cfg, state, ignore=unused)
    from_published = build(cfg, published)
    ids = sample_ids()
    with torch.no_grad():
        got = ours(ids)
        assert torch.equal(got, from_published(ids))  # same tensors, just renamed and split
        assert (got - ref(input_ids=ids).last_hidden_state).abs().max().item() <= 1e-4


def test_ldm_unknown_and_bad_keys_are_reported(reference):
    cfg, _, folder = reference
    tower = transformers_text_to_ldm(normalise_transformers_keys(read_safetensors(folder / "model.safetensors")))
    extra = {**tower, "transformer.resblocks.0.attn.extra": torch.zeros(1), "attn_pool.weight": torch.zeros(1)}
    state = ldm_to_transformers(extra, cfg.layers)
    with pytest.raises(CheckpointError, match=r"2 unexpected.*attn_pool\.weight.*resblocks\.0\.attn\.extra"):
        build(cfg, state, ignore=ldm_unused_keys(extra, cfg.layers))
    broken = {**tower, "transformer.resblocks.1.attn.in_proj_weight": torch.zeros(95, cfg.width)}
    with pytest.raises(CheckpointError, match=r"^v2-1\.safetensors \[cond.*\]: transformer\.resblocks\.1\.attn\.in_proj_weight.*\(95, 32\)"):
        ldm_to_transformers(broken, cfg.layers, source="v2-1.safetensors [cond_stage_model.model.*]")
    # A file with fewer blocks than the config: the strict loader names the missing layer.
    short = {k: v for k, v in tower.items() if not k.startswith("transformer.resblocks.1.")}
    with pytest.raises(CheckpointError, match=r"missing.*layers\.1\."):
        build(cfg, ldm_to_transformers(short, cfg.layers), ignore=ldm_unused_keys(short, cfg.layers))


def test_normalise_keeps_foreign_keys():
    state = {"encoder.layers.0.mlp.fc1.bias": 1, "text_model.final_layer_norm.bias": 2, "text_projection.weight": 3}
    assert normalise_transformers_keys(state) == {
        "text_model.encoder.layers.0.mlp.fc1.bias": 1, "text_model.final_layer_norm.bias": 2, "text_projection.weight": 3,
    }


def test_real_config_on_meta_matches_transformers():
    cfg = TextConfig.sd21()
    with torch.device("meta"):
        ours = TextEncoder(cfg)
        theirs = CLIPTextModel(transformers_config(cfg, projection_dim=512))
    assert sum(p.numel() for p in ours.parameters()) == 340_387_840
    assert list(ours.buffers()) == []
    their_keys = set(normalise_transformers_keys(dict.fromkeys(theirs.state_dict()))) - set(IGNORED_KEYS)
    assert set(ours.state_dict()) == their_keys
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in normalise_transformers_keys(theirs.state_dict()).items() if k in their_keys
    }


def test_config_from_real_open_clip_shapes():
    with torch.device("meta"):  # only shapes are read
        tower = {"token_embedding.weight": torch.empty(49408, 1024), "positional_embedding": torch.empty(77, 1024)}
        for i in range(24):  # the real file holds all 24 blocks of ViT-H/14's text tower
            tower[f"transformer.resblocks.{i}.mlp.c_fc.weight"] = torch.empty(4096, 1024)
    assert TextConfig.from_open_clip_state_dict(tower) == TextConfig.sd21()
    with pytest.raises(ValueError, match="no 'positional_embedding'"):
        TextConfig.from_open_clip_state_dict({k: v for k, v in tower.items() if k != "positional_embedding"})


def test_config_from_transformers_dict_errors():
    sd21 = {"hidden_size": 1024, "num_attention_heads": 16, "num_hidden_layers": 23, "intermediate_size": 4096,
            "hidden_act": "gelu", "layer_norm_eps": 1e-5, "max_position_embeddings": 77, "vocab_size": 49408}
    assert TextConfig.from_transformers_config(sd21) == TextConfig.sd21()
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        TextConfig.from_transformers_config({**sd21, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="missing hidden_size.*text_config"):
        TextConfig.from_transformers_config({"text_config": sd21, "vision_config": {}})
    with pytest.raises(ValueError, match="1000 does not split into 16 heads"):
        TextConfig.from_transformers_config({**sd21, "hidden_size": 1000})


def test_bad_ids_are_refused():
    torch.manual_seed(0)
    model = TextEncoder(TextConfig.tiny()).eval()
    ids = sample_ids(1)
    assert model(ids.int()).shape == (1, 77, 32)  # int32 ids are fine
    with pytest.raises(TypeError, match="dtype torch.float32"):
        model(ids.float())
    with pytest.raises(ValueError, match=r"shape \(77,\)"):
        model(ids[0])
    with pytest.raises(ValueError, match=r"shape \(1, 78\)"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 49408\), got \[0, 49408\]"):
        model(torch.cat([ids[:, :76], torch.tensor([[49408]])], dim=1))
    with pytest.raises(ValueError, match=r"got \[-1, "):
        model(ids - 1)
