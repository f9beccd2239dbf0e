"""TokenFlow's parts against their definitions: extended attention (Eq. 3-4), the NN field (Eq. 5),
the propagation weights (Eq. 7) and the propagation itself (Eq. 6), keyframe sampling, and the
sampling loop's determinism."""

import math

import pytest
import torch

from sampler.schedule import Schedule
from tokenflow.controls import EditControl, KeyframeTokens, Propagation
from tokenflow.config import EDIT_MODES, ConfigError, RunConfig
from tokenflow.edit import EditSettings, PromptEmbeddings, edit_video_latents
from tokenflow.keyframes import fixed_keyframes, random_keyframes
from tokenflow.propagation import keyframe_neighbours, nn_field, propagate
from unet import UNet, UNetConfig, attention
from unet.model import SelfAttention

pytestmark = pytest.mark.core  # the algorithm's own tests: `pytest -m core`


def naive_extended_attention(q, k, v, heads, frames):
    """Eq. 3-4 written the obvious way: each frame's queries against the EXPLICIT concatenation
    [K^{i1}, ..., K^{ik}] of its group's keys (and values), one frame at a time."""
    b, n, c = q.shape
    d = c // heads
    out = torch.empty_like(q)
    for i in range(b):
        g = i // frames
        keys = torch.cat([k[j] for j in range(g * frames, (g + 1) * frames)])  # [frames*N, C]
        values = torch.cat([v[j] for j in range(g * frames, (g + 1) * frames)])
        for h in range(heads):
            s = slice(h * d, (h + 1) * d)
            scores = q[i, :, s] @ keys[:, s].T / math.sqrt(d)
            out[i, :, s] = scores.softmax(-1) @ values[:, s]
    return out


@pytest.mark.parametrize("frames,chunk", [(1, None), (3, None), (4, 7), (6, 64)])
def test_extended_attention_equals_explicit_concatenation(frames, chunk):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2 * frames, 20, 32) for _ in range(3))
    got = attention(q, k, v, heads=4, joint_frames=frames, query_chunk=chunk)
    want = naive_extended_attention(q, k, v, 4, frames)
    assert (got - want).abs().max() <= 1e-5


def test_extended_attention_rejects_partial_groups():
    q = torch.randn(5, 4, 8)
    with pytest.raises(ValueError, match="not a whole number of groups of 2"):
        attention(q, q, q, heads=2, joint_frames=2)


def test_nn_field_recovers_permutation_and_shift():
    torch.manual_seed(0)
    keyframe = torch.randn(1, 64, 16)
    perm = torch.randperm(64)
    frame = keyframe[:, perm] * 3.0  # cosine distance ignores the scale
    assert torch.equal(nn_field(frame, keyframe)[0], perm)
    # a spatial shift on an 8x8 token grid: token (y, x) of the frame is token (y, x-1) of the keyframe
    grid = torch.randn(8, 8, 16)
    shifted = torch.roll(grid, shifts=1, dims=1)
    field = nn_field(shifted.reshape(1, 64, 16), grid.reshape(1, 64, 16))[0].reshape(8, 8)
    ys, xs = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    assert torch.equal(field, ys * 8 + (xs - 1) % 8)


def test_weights_follow_eq7_for_17_frames_interval_8():
    keyframes = [2, 11, 16]  # one per interval [0,8), [8,16), [16,17)
    nb = keyframe_neighbours(list(range(17)), keyframes, "sigmoid")
    for i in range(17):
        past = [k for k in keyframes if k <= i]
        future = [k for k in keyframes if k >= i]
        if not past:  # before the first keyframe: the future one alone
            assert (keyframes[nb.future[i]], nb.w[i].item()) == (future[0], 1.0)
            continue
        if not future:
            assert (keyframes[nb.past[i]], nb.w[i].item()) == (past[-1], 0.0)
            continue
        i_minus, i_plus = past[-1], future[0]
        assert keyframes[nb.past[i]] == i_minus and keyframes[nb.future[i]] == i_plus
        if i_minus == i_plus:
            continue  # a keyframe: both terms are the same tokens, w is immaterial
        d_minus, d_plus = i - i_minus, i_plus - i
        assert nb.w[i].item() == pytest.approx(1 / (1 + math.exp(-d_minus / (d_plus + d_minus))), abs=1e-6)
    linear = keyframe_neighbours(list(range(17)), keyframes, "linear")
    assert linear.w[5].item() == pytest.approx(3 / 9)
    with pytest.raises(ValueError, match="weighting"):
        keyframe_neighbours([0], [0], "cosine")
    # slots index the keyframe pass's batch in the order given: an unsorted or repeated list would
    # pair frames with another keyframe's tokens, so it is refused rather than sorted
    for bad in ([11, 2, 16], [2, 2, 11]):
        with pytest.raises(ValueError, match="strictly ascending"):
            keyframe_neighbours(list(range(17)), bad)


def test_propagation_of_original_features_with_every_frame_a_keyframe_is_identity():
    torch.manual_seed(0)
    n, tokens, c = 5, 16, 8
    features = torch.randn(n, tokens, c)
    nb = keyframe_neighbours(list(range(n)), list(range(n)))
    out = propagate(features[None].repeat(2, 1, 1, 1), features, features, nb)
    assert torch.equal(out, features[None].repeat(2, 1, 1, 1))


def test_propagation_runs_on_the_tokens_device():
    # neighbours are built on the CPU; tokens live on the accelerator. The meta device stands in
    # for CUDA here: any CPU tensor mixed into the arithmetic raises.
    nb = keyframe_neighbours([0, 1, 2], [0, 2])
    kf_out = torch.randn(2, 2, 6, 4, device="meta")
    out = propagate(kf_out, torch.randn(2, 6, 4, device="meta"), torch.randn(3, 6, 4, device="meta"), nb)
    assert out.device.type == "meta" and out.shape == (2, 3, 6, 4)


def test_propagation_combines_past_and_future_keyframes():
    torch.manual_seed(0)
    inputs = torch.randn(3, 6, 4)  # frames 0..2; keyframes 0 and 2; frame 1 == frame 0 permuted
    perm = torch.tensor([5, 4, 3, 2, 1, 0])
    inputs[1] = inputs[0, perm]
    inputs[2] = inputs[0]  # so frame 1's NN in keyframe 2 is the same permutation
    outputs = torch.randn(1, 2, 6, 4)  # edited tokens of keyframes 0 and 2
    nb = keyframe_neighbours([1], [0, 2], "linear")
    got = propagate(outputs, inputs[[0, 2]], inputs[[1]], nb)
    want = 0.5 * outputs[0, 1, perm] + 0.5 * outputs[0, 0, perm]
    assert torch.allclose(got[0, 0], want)


def test_keyframe_sampling():
    g = torch.Generator().manual_seed(3)
    draws = [random_keyframes(20, 8, g) for _ in range(50)]
    for kf in draws:
        assert len(kf) == 3 and 0 <= kf[0] < 8 <= kf[1] < 16 <= kf[2] < 20
    assert len({tuple(k) for k in draws}) > 10  # redrawn at every step
    again = [random_keyframes(20, 8, torch.Generator().manual_seed(3)) for _ in range(1)]
    assert again[0] == draws[0]
    assert fixed_keyframes(17, 8) == [0, 8, 16]
    assert fixed_keyframes(40, 8) == [0, 10, 20, 29, 39]
    assert fixed_keyframes(1, 8) == [0]
    with pytest.raises(ValueError, match="keyframe_interval"):
        random_keyframes(5, 0, g)


def test_keyframe_pass_records_tokens_and_propagation_pass_uses_them():
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).eval()
    frames, ctx = 3, torch.randn(9, 77, 64)
    x = torch.randn(9, 4, 8, 8)
    tokens = KeyframeTokens([0, 1, 2])
    with torch.no_grad():
        unet(x, 500, ctx, EditControl(frames, joint_frames=frames, record=tokens))
    assert len(tokens.edited_outputs) == 16 and len(tokens.source_inputs) == 16  # every self-attention
    shape = tokens.edited_outputs["up_blocks.3.attentions.2.transformer_blocks.0.attn1"].shape
    assert shape == (2, 3, 64, 64)
    # what is kept for the whole step holds only its own bytes, not the [3F, N, C] batch it came from
    for recorded in (*tokens.edited_outputs.values(), *tokens.source_inputs.values()):
        assert recorded.untyped_storage().nbytes() == recorded.numel() * recorded.element_size()
    nb = keyframe_neighbours([0, 1, 2], [0, 1, 2])
    with torch.no_grad():
        out = unet(x, 500, ctx, EditControl(frames, propagation=Propagation(tokens, nb)))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_propagation_pass_matches_tokens_by_the_source_branchs_inputs():
    """Eq. 5 is computed on the ORIGINAL video's features: the NN field of the propagation pass
    comes from the source branch's self-attention inputs x[:F], never from the edited branches'."""
    torch.manual_seed(0)
    frames, n_tokens, channels = 3, 16, 8
    attn = SelfAttention(channels, heads=2, upcast=False).eval()
    attn.path = "up_blocks.3.attentions.2.transformer_blocks.0.attn1"
    tokens = KeyframeTokens([0, 2])
    tokens.source_inputs[attn.path] = torch.randn(2, n_tokens, channels)  # phi of keyframes 0 and 2
    tokens.edited_outputs[attn.path] = torch.randn(2, 2, n_tokens, channels)  # T_base, both edited branches
    nb = keyframe_neighbours([0, 1, 2], [0, 2])
    x = torch.randn(3 * frames, n_tokens, channels)  # source | unconditional | conditional, all different
    with torch.no_grad():
        out = EditControl(frames, propagation=Propagation(tokens, nb)).self_attention(attn, x)
        source_out = attn.plain(x[:frames])
    edited = out[frames:].reshape(2, frames, n_tokens, channels)
    recorded = (tokens.edited_outputs[attn.path], tokens.source_inputs[attn.path])
    assert torch.equal(edited, propagate(*recorded, x[:frames], nb))
    assert not torch.allclose(edited, propagate(*recorded, x[frames:2 * frames], nb))  # the unconditional branch's
    assert torch.allclose(out[:frames], source_out)  # the source branch attends to itself, as ever


def tiny_edit_inputs(n=6):
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).eval()
    schedule = Schedule()
    ts = schedule.timesteps(4).tolist()
    source = {t: torch.randn(n, 4, 8, 8) for t in ts}
    prompts = PromptEmbeddings(*(torch.randn(1, 77, 64) for _ in range(3)))
    return unet, schedule, ts, source, torch.randn(n, 4, 8, 8), prompts


@pytest.mark.parametrize("mode", EDIT_MODES)
def test_seeded_edit_is_bit_identical(mode):
    unet, schedule, ts, source, clean, prompts = tiny_edit_inputs()
    settings = EditSettings(mode=mode, keyframe_interval=3, batch_size=4, seed=7)
    a, rec_a = edit_video_latents(unet, schedule, settings, prompts, source, clean, ts)
    b, rec_b = edit_video_latents(unet, schedule, settings, prompts, source, clean, ts)
    assert torch.equal(a, b) and rec_a.keyframes == rec_b.keyframes
    assert a.shape == clean.shape and torch.isfinite(a).all()
    if mode in ("tokenflow", "fixed_keyframes"):
        assert len(rec_a.keyframes) == len(ts)


def test_modes_differ_and_settings_are_validated():
    unet, schedule, ts, source, clean, prompts = tiny_edit_inputs()
    outs = {m: edit_video_latents(unet, schedule, EditSettings(mode=m, keyframe_interval=3), prompts, source, clean, ts)[0] for m in ("tokenflow", "per_frame")}
    assert not torch.allclose(outs["tokenflow"], outs["per_frame"])
    # the config's checks, naming the override as the user types it
    with pytest.raises(ConfigError, match="tokenflow.mode must be one of"):
        EditSettings(mode="magic")
    with pytest.raises(ConfigError, match="runs no edit loop"):
        EditSettings(mode="reconstruction")  # a run mode, not one of Alg. 1's
    with pytest.raises(ConfigError, match=r"method.qk_fraction must be in \[0, 1\], got 1.5"):
        EditSettings(pnp_qk_fraction=1.5)
    with pytest.raises(ConfigError, match="tokenflow.keyframe_interval must be an integer >= 1"):
        EditSettings(keyframe_interval=0)
    with pytest.raises(ConfigError, match="unknown method ddim"):
        EditSettings(method="ddim")
    with pytest.raises(ConfigError, match="guidance_scale must be a finite number"):
        EditSettings(guidance_scale="7.5")
    for strength in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"method.strength must be in \(0, 1\]"):
            EditSettings(method="sdedit", sdedit_strength=strength)
    assert EditSettings(method="sdedit", sdedit_strength=1.0).sdedit_strength == 1.0
    inj = EditSettings().injection(0, 50)
    assert inj.injects_qk("up_blocks.3.attentions.2.transformer_blocks.0.attn1")
    assert not inj.injects_qk("up_blocks.1.attentions.0.transformer_blocks.0.attn1")
    assert EditSettings().injection(25, 50).qk_layers == () and EditSettings().injection(39, 50).feature_layers
    assert EditSettings().injection(40, 50).feature_layers == ()
    assert EditSettings(method="sdedit").injection(0, 50).qk_layers == ()


def test_settings_come_from_the_run_config():
    """EditSettings' defaults are the config's, and from_config carries every loop setting over."""
    assert EditSettings.from_config(RunConfig()) == EditSettings()
    cfg = RunConfig.from_dict({
        "seed": 5, "guidance_scale": 3.0, "method": {"name": "pnp", "qk_fraction": 0.2, "feature_fraction": 0.4,
                                                    "qk_layers": ["up_blocks.3.attentions.0"], "feature_layers": []},
        "tokenflow": {"mode": "fixed_keyframes", "keyframe_interval": 3, "weighting": "linear", "reuse_keyframes": False,
                      "batch_size": 2, "query_chunk": 64},
    })
    assert EditSettings.from_config(cfg) == EditSettings(
        mode="fixed_keyframes", method="pnp", guidance_scale=3.0, keyframe_interval=3, weighting="linear",
        propagation="paper", reuse_keyframes=False, batch_size=2, seed=5, pnp_qk_fraction=0.2, pnp_feature_fraction=0.4,
        pnp_qk_layers=("up_blocks.3.attentions.0",), pnp_feature_layers=(), query_chunk=64)
    sdedit = EditSettings.from_config(RunConfig.from_dict({"method": {"name": "sdedit", "strength": 0.3},
                                                           "tokenflow": {"propagation": "released"}}))
    assert (sdedit.method, sdedit.sdedit_strength, sdedit.propagation) == ("sdedit", 0.3, "released")


def test_keyframes_of_a_step_are_a_function_of_seed_and_step():
    from dataclasses import replace

    from tokenflow.edit import keyframes_at

    s = EditSettings(keyframe_interval=4, seed=3)
    assert keyframes_at(s, 20, 5) == keyframes_at(s, 20, 5)
    assert len({tuple(keyframes_at(s, 20, k)) for k in range(20)}) > 5  # redrawn at every step
    assert keyframes_at(replace(s, seed=4), 20, 5) != keyframes_at(s, 20, 5) or keyframes_at(replace(s, seed=4), 20, 6) != keyframes_at(s, 20, 6)
    assert keyframes_at(replace(s, mode="per_frame"), 20, 0) is None
    assert keyframes_at(replace(s, mode="fixed_keyframes"), 20, 7) == fixed_keyframes(20, 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nn_field_in_reduced_precision_flips_only_near_ties(dtype):
    """nn_field normalises in float32 and compares in the tokens' dtype (tensor cores on a GPU).
    Against the float32 field of the same tokens, a token may only change its neighbour to one
    whose float32 similarity is within the dtype's rounding of the best (a near tie)."""
    torch.manual_seed(0)
    frames = torch.randn(4, 256, 64)
    keyframes = frames[torch.tensor([1, 2, 3, 0])] + 0.5 * torch.randn(4, 256, 64)  # related, not equal
    exact = nn_field(frames, keyframes)
    reduced = nn_field(frames.to(dtype), keyframes.to(dtype))
    a = torch.nn.functional.normalize(frames, dim=-1)
    b = torch.nn.functional.normalize(keyframes, dim=-1)
    sims = a @ b.transpose(1, 2)  # [F, N, M] float32
    best = sims.gather(-1, exact[..., None])[..., 0]
    chosen = sims.gather(-1, reduced[..., None])[..., 0]
    eps = torch.finfo(dtype).eps  # 2^-7 for bfloat16, 2^-10 for float16
    assert ((best - chosen) <= 4 * eps).all()  # every change is a near tie
    assert (reduced != exact).float().mean().item() < 0.05  # and rare
