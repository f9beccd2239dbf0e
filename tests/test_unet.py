"""UNet: parity with diffusers' UNet2DConditionModel (eps and upcast/v variants), the ldm layout,
the real config's size and key set, and the control seam being a no-op by default."""

import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fixtures_sd import fill_on_meta, perturb
from ldm_writer_unet import diffusers_unet_to_ldm
from tokenflow.models.checkpoint import CheckpointError, strip_prefix
from unet import UNet, UNetConfig, UNetControl
from unet.attention import attention
from unet.keys import config_from_ldm, ldm_to_diffusers

diffusers = pytest.importorskip("diffusers")

SD21_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    use_linear_projection=True, layers_per_block=2,
)


def reference_unet(upcast: bool, seed: int = 0):
    """A small member of the SD-2.1 family: same block types, 64-channel heads, linear proj, GEGLU."""
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(64, 64, 128, 128), attention_head_dim=[1, 1, 2, 2],
        cross_attention_dim=64, upcast_attention=upcast, **SD21_BLOCKS,
    )
    return perturb(ref, seed + 1)


def ours_from(state, cfg):
    return fill_on_meta(UNet, cfg, state)


@pytest.mark.parametrize("upcast", [False, True])
def test_parity_with_diffusers(upcast):
    ref = reference_unet(upcast)
    ours = ours_from(dict(ref.state_dict()), UNetConfig.from_diffusers_config(dict(ref.config)))
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 64)
    for t in (torch.tensor([3, 700]), 981):
        with torch.no_grad():
            want = ref(x, t, ctx).sample
            got = ours(x, t, ctx)
            plain_control = ours(x, t, ctx, UNetControl())
        assert got.shape == x.shape
        assert (got - want).abs().max() <= 1e-4
        assert torch.equal(got, plain_control)
    ours.set_feed_forward_chunk(7)  # memory knob: chunks of 7 tokens give the same numbers
    with torch.no_grad():
        assert (ours(x, 981, ctx) - ref(x, 981, ctx).sample).abs().max() <= 1e-4


def test_odd_latent_size_matches_diffusers():
    ref = reference_unet(False)
    ours = ours_from(dict(ref.state_dict()), UNetConfig.from_diffusers_config(dict(ref.config)))
    x, ctx = torch.randn(1, 4, 12, 20), torch.randn(1, 77, 64)
    with torch.no_grad():
        assert (ours(x, 10, ctx) - ref(x, 10, ctx).sample).abs().max() <= 1e-4


def test_ldm_layout_roundtrip_and_config_inference():
    ref = reference_unet(False)
    cfg = UNetConfig.from_diffusers_config(dict(ref.config))
    ldm = diffusers_unet_to_ldm(ref.state_dict(), 4, 2, cfg.attention_levels)
    raw = strip_prefix(ldm, "model.diffusion_model.")
    inferred = config_from_ldm(raw, upcast_attention=False, sample_size=8)
    assert inferred == cfg
    ours = ours_from(ldm_to_diffusers(raw, inferred), inferred)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64)
    with torch.no_grad():
        assert (ours(x, 500, ctx) - ref(x, 500, ctx).sample).abs().max() <= 1e-4


def test_config_from_ldm_names_what_is_missing():
    ref = reference_unet(False)
    cfg = UNetConfig.from_diffusers_config(dict(ref.config))
    raw = strip_prefix(diffusers_unet_to_ldm(ref.state_dict(), 4, 2, cfg.attention_levels), "model.diffusion_model.")
    where = "v2-1.safetensors [model.diffusion_model.*]"

    def infer(state):
        return config_from_ldm(state, upcast_attention=False, sample_size=8, source=where)

    cases = [  # (state dict, what the message says after the source)
        ({}, r"no 'input_blocks\.0\.0\.weight'"),
        ({k: v for k, v in raw.items() if not k.startswith("out.2.")}, r"no 'out\.2\.weight'"),
        ({k: v for k, v in raw.items() if ".attn2." not in k}, r"no cross-attention weights"),
        ({k: v for k, v in raw.items() if not k.startswith("input_blocks.11.")},
         r"10 input_blocks .* do not split into 4 levels"),
    ]
    for state, message in cases:
        with pytest.raises(ValueError, match=re.escape(f"{where}: ") + message):
            infer(state)


def test_real_configs_on_meta():
    with torch.device("meta"):
        ours = UNet(UNetConfig.sd21_base())
        ref = diffusers.UNet2DConditionModel(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=[5, 10, 20, 20],
            cross_attention_dim=1024, **SD21_BLOCKS,
        )
    assert sum(p.numel() for p in ours.parameters()) == 865_910_724
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert len(ours.state_dict()) == 686
    assert UNetConfig.from_diffusers_config(dict(ref.config)) == UNetConfig.sd21_base()
    v_model = UNetConfig.sd21()
    assert v_model.upcast_attention and v_model.sample_size == 96


def test_bad_inputs_and_configs():
    model = UNet(UNetConfig.tiny()).eval()
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(1, 3, 8, 8), 1, torch.randn(1, 77, 64))
    with pytest.raises(ValueError, match="context must be"):
        model(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 77, 32))
    with pytest.raises(ValueError, match="t must be"):
        model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2, 3]), torch.randn(2, 77, 64))
    with pytest.raises(ValueError, match="64 channels do not split into 3 heads"):
        UNetConfig(block_out_channels=(64,), attention_levels=(True,), heads=(3,))
    with pytest.raises(ValueError, match="unsupported block types"):
        UNetConfig.from_diffusers_config(dict(block_out_channels=[32], down_block_types=["SimpleCrossAttnDownBlock2D"], up_block_types=["UpBlock2D"]))


def test_strict_loading_names_the_problem():
    cfg = UNetConfig.tiny()
    state = UNet(cfg).state_dict()
    bad = dict(state)
    bad["conv_in.weight"] = torch.zeros(64, 4, 1, 1)
    with pytest.raises(CheckpointError, match=r"conv_in.weight: checkpoint \(64, 4, 1, 1\) vs model \(64, 4, 3, 3\)"):
        ours_from(bad, cfg)
    missing = dict(state)
    del missing["up_blocks.1.resnets.1.conv2.bias"]
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): up_blocks.1.resnets.1.conv2.bias"):
        ours_from(missing, cfg)
    extra = dict(state, **{"mid_block.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): mid_block.extra.weight"):
        ours_from(extra, cfg)


class SDPAWatch(TorchFunctionMode):
    """Records the dtype of every q reaching F.scaled_dot_product_attention.

    With `input_dtype_scores=True` it also computes the attention the way a kernel that materialises
    the scores in its input dtype does (q k^T in float16, then softmax), instead of calling SDPA.
    Why: PyTorch's own CPU SDPA (flash and math) accumulates float16 in float32 internally, measured on
    this machine: upcast=True and False give identical numbers, so only such a kernel shows the
    overflow the 768 v-model's `upcast_attention` exists for.
    """

    def __init__(self, input_dtype_scores: bool = False):
        super().__init__()
        self.input_dtype_scores = input_dtype_scores
        self.dtypes: list[torch.dtype] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        self.dtypes.append(q.dtype)
        if not self.input_dtype_scores:
            return func(*args, **kwargs)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # in q's dtype: overflows in float16
        return scores.softmax(dim=-1) @ v


def test_upcast_attention_runs_in_float32_and_survives_overflowing_scores():
    torch.manual_seed(0)
    # |q.k| reaches ~1e5 > float16's 65504; a 64-wide single head, so the softmax is one-hot-like and
    # float16 rounding of q, k, v cannot move it: the float32 result is the right answer for both.
    q, k, v = torch.randn(1, 16, 64) * 100, torch.randn(1, 16, 64) * 100, torch.randn(1, 16, 64)
    want = attention(q, k, v, heads=1)
    half = [t.half() for t in (q, k, v)]
    with SDPAWatch(input_dtype_scores=True) as watch:
        upcast = attention(*half, heads=1, upcast=True)
        plain = attention(*half, heads=1, upcast=False)
    assert watch.dtypes == [torch.float32, torch.float16]
    assert upcast.dtype == torch.float16  # computed in float32, handed back in the caller's dtype
    assert torch.isfinite(upcast).all() and (upcast.float() - want).abs().max() <= 1e-2
    assert not torch.isfinite(plain).all()  # the same kernel without upcasting: inf - inf in the softmax
    with SDPAWatch() as watch:  # and through PyTorch's own SDPA: float32 reaches it only when upcast
        attention(*half, heads=1, upcast=True, query_chunk=5)
        attention(*half, heads=1, upcast=False)
    assert watch.dtypes == [torch.float32] * 4 + [torch.float16]


@pytest.mark.parametrize("upcast", [False, True])
def test_float16_unet_with_upcast_attention(upcast):
    cfg = replace(UNetConfig.tiny(), upcast_attention=upcast)
    torch.manual_seed(0)
    full = UNet(cfg).eval()
    half = UNet(cfg).eval()
    half.load_state_dict(full.state_dict())
    half.half()
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, cfg.cross_attention_dim)
    with torch.no_grad():
        want = full(x, 10, ctx)
        with SDPAWatch() as watch:
            got = half(x.half(), 10, ctx.half())
    # 16 transformer blocks (down 2+2+2, mid 1, up 3+3+3), self- and cross-attention in each
    assert watch.dtypes == [torch.float32 if upcast else torch.float16] * 32
    assert got.dtype == torch.float16 and (got.float() - want).abs().max() <= 1e-2
    with torch.no_grad():  # q and k scaled up: scores overflow float16 in a kernel that keeps them there
        for name, module in half.named_modules():
            if name.endswith("attn1"):
                module.to_q.weight.mul_(100)
                module.to_k.weight.mul_(100)
        with SDPAWatch(input_dtype_scores=True):
            scaled = half(x.half(), 10, ctx.half())
    assert torch.isfinite(scaled).all() == upcast
