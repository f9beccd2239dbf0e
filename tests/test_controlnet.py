"""ControlNet: parity with diffusers' ControlNetModel (loaded from a diffusers folder and from an
original single file), the UNet with residuals against diffusers' UNet given the same residuals,
residuals landing on exactly the skip connections and the mid block, scaled, and strict loading."""

import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures_sd import fill_on_meta, isolate_hub_cache, perturb
from ldm_writer_controlnet import diffusers_controlnet_to_ldm
from tokenflow.models.checkpoint import CheckpointError
from tokenflow.models.controlnet_loading import build_random_controlnet, load_controlnet
from tokenflow.models.loading import ModelNotAvailable
from unet.control import ControlResiduals
from unet.controlnet import ControlNet
from unet.model import ResnetBlock, UNet, UNetConfig, encoder_skip_channels

BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2,
)
# the tiny presets' shapes in diffusers' terms (attention_head_dim is the head COUNT)
SHAPES = {
    "sd2": dict(attention_head_dim=[1, 1, 2, 2], use_linear_projection=True, cross_attention_dim=64),
    "sd15": dict(attention_head_dim=8, use_linear_projection=False, cross_attention_dim=48),
}
OURS = {"sd2": UNetConfig.tiny, "sd15": UNetConfig.tiny_sd15}
ATTENTION = (True, True, True, False)


def references(kind: str):
    """A diffusers UNet of the tiny preset's shape and a ControlNetModel made from it, each perturbed
    (zero convs included) so every tensor of both matters."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=8, block_out_channels=(64, 64, 128, 128), **SHAPES[kind], **BLOCKS)
    controlnet = diffusers.ControlNetModel.from_unet(unet)
    return perturb(unet, 1), perturb(controlnet, 2)


@pytest.fixture(scope="module", params=["sd2", "sd15"])
def case(request, tmp_path_factory):
    """kind, reference UNet and ControlNet, our UNet config, the ControlNet as a diffusers folder and
    as an original single file."""
    kind = request.param
    ref_unet, ref_cn = references(kind)
    cfg = UNetConfig.from_diffusers_config(dict(ref_unet.config))
    assert cfg == OURS[kind]()  # the tests' references are the presets' shapes
    root = tmp_path_factory.mktemp(f"controlnet-{kind}")
    ref_cn.save_pretrained(root / "folder")
    single = root / f"control_{kind}_canny.safetensors"
    ldm = diffusers_controlnet_to_ldm(ref_cn.state_dict(), 4, 2, ATTENTION)
    save_file({k: v.contiguous() for k, v in ldm.items()}, single)
    return dict(kind=kind, ref_unet=ref_unet, ref_cn=ref_cn, cfg=cfg, folder=root / "folder", single=single)


def inputs(cfg: UNetConfig, batch: int = 2, h: int = 8, w: int = 8, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=g)
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
    cond = torch.rand(batch, 3, 8 * h, 8 * w, generator=g)
    return x, ctx, cond


def max_diff(ours: ControlResiduals, down, mid) -> float:
    assert len(ours.down) == len(down) == 12
    return max([(a - b).abs().max().item() for a, b in zip(ours.down, down)] + [(ours.mid - mid).abs().max().item()])


@pytest.mark.parametrize("layout", ["folder", "single"])
def test_parity_with_diffusers_controlnet(case, layout):
    ours = load_controlnet(case[layout], case["cfg"])
    assert set(ours.state_dict()) == set(case["ref_cn"].state_dict())
    x, ctx, cond = inputs(case["cfg"])
    for t, scale in ((torch.tensor([3, 700]), 0.7), (981, 1.0)):
        with torch.no_grad():
            down, mid = case["ref_cn"](x, t, ctx, cond, conditioning_scale=scale, return_dict=False)
            got = ours(x, t, ctx, cond, scale)
        assert max_diff(got, down, mid) <= 1e-5
        assert min(r.abs().mean().item() for r in got.down) > 1e-3  # perturbed zero convs: real residuals
    with torch.no_grad():  # odd latent sizes too (the condition image stays 8x the latents)
        x, ctx, cond = inputs(case["cfg"], batch=1, h=12, w=20)
        down, mid = case["ref_cn"](x, 10, ctx, cond, return_dict=False)
        assert max_diff(ours(x, 10, ctx, cond), down, mid) <= 1e-5


def test_unet_with_residuals_matches_diffusers(case):
    ours_unet = fill_on_meta(UNet, case["cfg"], dict(case["ref_unet"].state_dict()))
    ours_cn = load_controlnet(case["folder"], case["cfg"])
    x, ctx, cond = inputs(case["cfg"])
    t = torch.tensor([11, 501])
    with torch.no_grad():
        down, mid = case["ref_cn"](x, t, ctx, cond, conditioning_scale=0.8, return_dict=False)
        want = case["ref_unet"](x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        given = ours_unet(x, t, ctx, residuals=ControlResiduals(list(down), mid))  # diffusers' residuals
        chained = ours_unet(x, t, ctx, residuals=ours_cn(x, t, ctx, cond, 0.8))  # ours end to end
        plain = case["ref_unet"](x, t, ctx).sample
    assert (given - want).abs().max() <= 1e-4
    assert (chained - want).abs().max() <= 1e-4
    assert (want - plain).abs().max() > 1e-2  # the residuals matter at this scale


# ----------------------------------------------------------------------------- where residuals land


def skip_inputs(unet: UNet, *args, **kwargs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every decoder resnet's input split into (what came up from below, the skip connection it was
    fed), in the order the decoder runs them (it takes the encoder's skips last-pushed first)."""
    skip_channels = encoder_skip_channels(unet.config)[::-1]
    ups, skips, hooks = [], [], []

    def record(module, args_):
        c = skip_channels[len(skips)]
        ups.append(args_[0][:, :-c].clone())
        skips.append(args_[0][:, -c:].clone())

    for name, module in unet.named_modules():
        if name.startswith("up_blocks.") and isinstance(module, ResnetBlock):
            hooks.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            unet(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return ups, skips


@pytest.mark.core
def test_residuals_land_on_exactly_the_skips_and_the_mid_block():
    cfg = UNetConfig.tiny()
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    x, ctx, _ = inputs(cfg)
    plain_ups, plain_skips = skip_inputs(unet, x, 400, ctx)
    n = len(plain_skips)
    assert n == 12
    for i in (0, 4, 11):  # skip i is consumed by decoder resnet n-1-i
        r = torch.randn_like(plain_skips[n - 1 - i])
        down = [torch.zeros_like(s) for s in plain_skips[::-1]]
        down[i] = r
        mid = torch.zeros_like(plain_ups[0])
        _, skips = skip_inputs(unet, x, 400, ctx, residuals=ControlResiduals(down, mid))
        for j, (got, want) in enumerate(zip(skips, plain_skips)):
            expect = want + r if j == n - 1 - i else want
            assert torch.equal(got, expect), f"residual {i} reached decoder resnet {j}"
    r = torch.randn_like(plain_ups[0])  # the mid residual: on what the first decoder resnet gets from below
    down = [torch.zeros_like(s) for s in plain_skips[::-1]]
    ups, skips = skip_inputs(unet, x, 400, ctx, residuals=ControlResiduals(down, r))
    assert torch.equal(ups[0], plain_ups[0] + r)
    assert all(torch.equal(a, b) for a, b in zip(skips, plain_skips))


@pytest.mark.core
def test_conditioning_scale_multiplies_the_residuals_and_zero_is_no_controlnet():
    cfg = UNetConfig.tiny_sd15()
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    controlnet = build_random_controlnet(cfg, seed=3)
    x, ctx, cond = inputs(cfg)
    with torch.no_grad():
        plain = unet(x, 300, ctx)
        zero = unet(x, 300, ctx, residuals=controlnet(x, 300, ctx, cond, scale=0.0))
        one, two = controlnet(x, 300, ctx, cond, 1.0), controlnet(x, 300, ctx, cond, 2.0)
        controlled = unet(x, 300, ctx, residuals=one)
    assert torch.equal(zero, plain)  # bit for bit
    assert all(torch.equal(b, 2 * a) for a, b in zip(one.down + [one.mid], two.down + [two.mid]))
    assert (controlled - plain).abs().max() > 1e-2
    for r, c in zip(one.down, encoder_skip_channels(cfg)):
        assert r.shape[:2] == (2, c)


def test_random_controlnet_is_seeded_and_leaves_the_global_random_state():
    cfg = UNetConfig.tiny()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_random_controlnet(cfg, seed=1)
    assert torch.equal(torch.rand(1), before)
    b, c = build_random_controlnet(cfg, seed=1), build_random_controlnet(cfg, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["controlnet_mid_block.weight"], sc["controlnet_mid_block.weight"])
    assert all(sa[f"controlnet_down_blocks.{i}.weight"].abs().max() > 0 for i in range(12))
    assert sa["controlnet_cond_embedding.conv_out.weight"].abs().max() > 0
    meta = build_random_controlnet(UNetConfig.sd15(), device="meta")
    assert meta.controlnet_mid_block.weight.is_meta
    assert not ControlNet(cfg).controlnet_mid_block.weight.any()  # the model itself starts as the paper's no-op


def test_real_config_matches_diffusers_key_set_and_size():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ours = ControlNet(UNetConfig.sd15())
        ref = diffusers.ControlNetModel(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                                        cross_attention_dim=768, layers_per_block=2)
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 361_279_120


def test_bad_inputs_are_one_line():
    cfg = UNetConfig.tiny()
    torch.manual_seed(0)
    unet, controlnet = UNet(cfg).eval(), ControlNet(cfg).eval()
    x, ctx, cond = inputs(cfg)
    with pytest.raises(ValueError, match=re.escape("controlnet: cond must be [2, 3, 64, 64] (8x the latents 8x8), got [2, 3, 32, 32]")):
        controlnet(x, 1, ctx, cond[..., :32, :32])
    with pytest.raises(ValueError, match="controlnet: context must be"):
        controlnet(x, 1, ctx[..., :32], cond)
    with torch.no_grad():
        r = controlnet(x, 1, ctx, cond)
    with pytest.raises(ValueError, match="unet: 11 control residuals for 12 skip connections"):
        unet(x, 1, ctx, residuals=ControlResiduals(r.down[:11], r.mid))
    with pytest.raises(ValueError, match=re.escape("unet: control residual 0 is (1, 64, 8, 8), its skip connection (2, 64, 8, 8)")):
        unet(x, 1, ctx, residuals=ControlResiduals([d[:1] for d in r.down], r.mid))


# ----------------------------------------------------------------------------- strict loading


def edited_folder(case, tmp_path, edit):
    """A copy of the case's diffusers folder whose weights went through `edit(state)`."""
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(case["folder"], copy)
    f = copy / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    edit(state)
    save_file(state, f)
    return copy


def edited_single(case, tmp_path, edit):
    state = load_file(case["single"])
    edit(state)
    f = tmp_path / "edited.safetensors"
    save_file(state, f)
    return f


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("layout, edit, message", [
    ("folder", lambda s: s.pop("controlnet_down_blocks.3.weight"), r"1 missing key\(s\): controlnet_down_blocks.3.weight"),
    ("folder", lambda s: s.update({"controlnet_down_blocks.12.weight": torch.zeros(1)}),
     r"1 unexpected key\(s\): controlnet_down_blocks.12.weight"),
    ("folder", lambda s: s.update({"controlnet_mid_block.weight": torch.zeros(128, 128, 3, 3)}),
     r"controlnet_mid_block.weight: checkpoint \(128, 128, 3, 3\) vs model \(128, 128, 1, 1\)"),
    ("single", lambda s: s.pop("control_model.zero_convs.5.0.bias"), r"1 missing key\(s\): controlnet_down_blocks.5.bias"),
    ("single", lambda s: s.update({"control_model.zero_convs.12.0.weight": torch.zeros(1)}),
     r"1 unexpected key\(s\): controlnet_down_blocks.12.weight"),  # named as the model names it
    ("single", lambda s: s.update({"control_model.input_hint_block.14.weight": torch.zeros(64, 256, 1, 1)}),
     r"controlnet_cond_embedding.conv_out.weight: checkpoint \(64, 256, 1, 1\) vs model \(64, 256, 3, 3\)"),
    ("single", lambda s: s.update({"model.diffusion_model.out.2.weight": torch.zeros(1)}),
     r"1 unexpected key\(s\) outside control_model.\*: \['model.diffusion_model.out.2.weight'\]"),
])
def test_strict_loading_names_the_key(case, tmp_path, layout, edit, message):
    source = (edited_folder if layout == "folder" else edited_single)(case, tmp_path, edit)
    with pytest.raises(CheckpointError, match=re.escape(str(source)) + ".*" + message) as err:
        load_controlnet(source, case["cfg"])
    one_line(err)


@pytest.mark.parametrize("layout", ["folder", "single"])
def test_controlnet_of_the_other_family_is_refused(case, layout):
    other = UNetConfig.tiny() if case["kind"] == "sd15" else UNetConfig.tiny_sd15()
    mine, theirs = ("SD-1.x", "SD-2.x") if case["kind"] == "sd15" else ("SD-2.x", "SD-1.x")
    with pytest.raises(CheckpointError) as err:
        load_controlnet(case[layout], other)
    text = one_line(err)
    assert text.startswith(f"{case[layout]}: an {mine} (")
    assert f"ControlNet cannot condition the {theirs} (" in text
    # the same family with another text width (SD-1.x's 768 against an SD-1.x-like 1024) is refused too
    wider = replace(case["cfg"], cross_attention_dim=case["cfg"].cross_attention_dim * 2)
    with pytest.raises(CheckpointError, match=f"{case['cfg'].cross_attention_dim * 2}-wide text\\) model"):
        load_controlnet(case[layout], wider)


def test_controlnet_of_other_widths_is_refused(case):
    narrower = replace(case["cfg"], block_out_channels=(32, 32, 64, 64))
    with pytest.raises(CheckpointError, match=re.escape("encoder") + r".*\(64, 64, 128, 128\).*\(32, 32, 64, 64\)"):
        load_controlnet(case["folder"], narrower)


def test_files_that_are_not_a_controlnet(case, tmp_path):
    unet_file = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in case["ref_unet"].state_dict().items()}, unet_file)
    with pytest.raises(CheckpointError, match=r"unet.safetensors: no control_model.\* keys: not an original-layout ControlNet"):
        load_controlnet(unet_file, case["cfg"])
    pickled = tmp_path / "control_v11p_sd15_canny.pth"
    pickled.write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle checkpoints"):
        load_controlnet(pickled, case["cfg"])
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        load_controlnet(_without_config(case, tmp_path), case["cfg"])
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_controlnet(tmp_path / "missing.safetensors", case["cfg"])


def _without_config(case, tmp_path):
    folder = edited_folder(case, tmp_path, lambda s: None)
    (folder / "config.json").unlink()
    return folder


def test_offline_hub_id_names_the_files_to_fetch(monkeypatch, tmp_path):
    cache = isolate_hub_cache(monkeypatch, tmp_path / "hf")
    with pytest.raises(ModelNotAvailable) as err:
        load_controlnet("lllyasviel/control_v11p_sd15_canny", UNetConfig.sd15())
    text = one_line(err)
    assert "lllyasviel/control_v11p_sd15_canny" in text and str(cache) in text
    assert ("hf download lllyasviel/control_v11p_sd15_canny --include config.json "
            "--include diffusion_pytorch_model.safetensors") in text
    with pytest.raises(ModelNotAvailable, match=re.escape("--include diffusion_pytorch_model.fp16.safetensors")):
        load_controlnet("lllyasviel/control_v11p_sd15_canny", UNetConfig.sd15(), variant="fp16")


def test_hub_id_and_hub_file_load_from_the_cache(case, monkeypatch, tmp_path):
    """A diffusers ControlNet repository (`owner/repo`) and one original file inside a repository
    (`owner/repo/file.safetensors`, as SD-2.1 ControlNets are published), answered by the cache offline."""
    from test_hub_cache import write_hub_cache

    cache = isolate_hub_cache(monkeypatch, tmp_path / "hf")
    write_hub_cache(cache, "tiny-org/controlnet-folder", case["folder"])
    files = tmp_path / "files"
    files.mkdir()
    (files / "control_v11p_tiny_canny.safetensors").write_bytes(case["single"].read_bytes())
    write_hub_cache(cache, "tiny-org/controlnet-files", files)
    x, ctx, cond = inputs(case["cfg"])
    with torch.no_grad():
        down, mid = case["ref_cn"](x, 7, ctx, cond, return_dict=False)
        for source in ("tiny-org/controlnet-folder", "tiny-org/controlnet-files/control_v11p_tiny_canny.safetensors"):
            assert max_diff(load_controlnet(source, case["cfg"])(x, 7, ctx, cond), down, mid) <= 1e-5, source
    with pytest.raises(ModelNotAvailable) as err:
        load_controlnet("tiny-org/controlnet-files/control_v11p_tiny_depth.safetensors", case["cfg"])
    assert "hf download tiny-org/controlnet-files control_v11p_tiny_depth.safetensors" in one_line(err)
