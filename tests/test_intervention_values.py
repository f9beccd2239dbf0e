"""Value checks of each intervention of the algorithm, each written to fail for one specific bug:
the Eq. 6-7 weights and fields on an asymmetric case, guidance direction and scale, where PnP
injects (layers, steps, branches) and nothing else, what the keyframe and propagation passes are
given, and SDEdit's start."""

import math

import pytest
import torch
from torch import nn

import tokenflow.controls as controls
import tokenflow.edit as edit
from oracle_alg1 import paper_pair, released_pair
from sampler.schedule import Schedule
from tokenflow.controls import EditControl
from tokenflow.edit import EditSettings, LoopWatch, PromptEmbeddings, denoise_step, edit_start, edit_video_latents
from tokenflow.propagation import keyframe_neighbours, propagate
from unet import UNet, UNetConfig

pytestmark = pytest.mark.core


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------------------------
# Eq. 6-7 on an asymmetric case


def test_eq7_weights_on_unevenly_placed_keyframes():
    # keyframes 1, 6, 8 of 10 frames: frame 2 is 1 from its past keyframe and 4 from its future one
    nb = keyframe_neighbours(list(range(10)), [1, 6, 8], "sigmoid")
    slots = [1, 6, 8]
    assert (slots[nb.past[2]], slots[nb.future[2]]) == (1, 6)
    assert nb.w[2].item() == pytest.approx(sigmoid(1 / 5))  # the weight of the FUTURE keyframe (i+)
    assert (slots[nb.past[5]], slots[nb.future[5]]) == (1, 6)
    assert nb.w[5].item() == pytest.approx(sigmoid(4 / 5))
    assert (slots[nb.past[7]], slots[nb.future[7]], nb.w[7].item()) == (6, 8, pytest.approx(sigmoid(0.5)))
    assert (slots[nb.future[0]], nb.w[0].item()) == (1, 1.0)  # before the first: the future keyframe alone
    assert (slots[nb.past[9]], nb.w[9].item()) == (8, 0.0)  # after the last: the past keyframe alone


def test_eq6_blends_each_keyframe_through_its_own_nn_field():
    """Frame 2 between keyframes 1 (d- = 1) and 6 (d+ = 4): its tokens are found in keyframe 1 by
    one permutation and in keyframe 6 by another. A swapped field, a swapped weight or a gather
    from the wrong keyframe changes the result."""
    torch.manual_seed(0)
    tokens, channels = 12, 8
    frame = torch.randn(tokens, channels)
    perm_past, perm_future = torch.randperm(tokens), torch.randperm(tokens)
    # keyframe token q is frame token perm[q]: frame token p is found at q = inverse(perm)[p]
    kf_inputs = torch.stack([frame[perm_past], frame[perm_future]])  # keyframes 1 and 6
    kf_outputs = torch.randn(2, 2, tokens, channels)  # two branches, two keyframes
    nb = keyframe_neighbours([2], [1, 6], "sigmoid")
    got = propagate(kf_outputs, kf_inputs, frame[None], nb)[:, 0]  # [2, N, C]
    w = sigmoid(1 / 5)
    want = w * kf_outputs[:, 1, perm_future.argsort()] + (1 - w) * kf_outputs[:, 0, perm_past.argsort()]
    assert torch.allclose(got, want, atol=1e-6)


def test_released_rule_table_for_24_frames():
    """The released code's neighbours and weights, 24 frames, interval 8, keyframes 3, 9, 22:
    group b blends k_b (weight w) and k_{b-1}, distances to the group centres 4, 12, 20."""
    keyframes = [3, 9, 22]
    nb = keyframe_neighbours(list(range(24)), keyframes, rule="released", interval=8)
    table = []
    for i in range(24):
        pairs = {keyframes[int(nb.future[i])]: nb.w[i].item()}
        if nb.w[i].item() != 1.0:
            pairs[keyframes[int(nb.past[i])]] = 1 - nb.w[i].item()
        table.append(pairs)
    for i in range(8):  # group 0: keyframe 3 alone, also for frames after it
        assert table[i] == {3: 1.0}
    # frame 8: group 1, d_cur = |8 - 12| = 4, d_prev = |8 - 4| = 4: w = sigmoid(1/2) on keyframe 9
    assert table[8] == {9: pytest.approx(sigmoid(0.5)), 3: pytest.approx(1 - sigmoid(0.5))}
    # frame 12 (a group centre): d_cur 0, d_prev 8: w = sigmoid(1); keyframe 9 lies BEFORE frame 12
    assert table[12][9] == pytest.approx(sigmoid(1.0))
    # frame 23: group 2 (centre 20), d_cur 3, d_prev 11: k_2 = 22 and k_1 = 9
    assert table[23] == {22: pytest.approx(sigmoid(11 / 14)), 9: pytest.approx(1 - sigmoid(11 / 14))}
    for i in range(24):  # and the oracle's reading of the same rule
        want = {k: pytest.approx(w) for k, w in released_pair(i, keyframes, 8)}
        assert table[i] == want
    # the paper's rule differs: frame 12 blends its nearest keyframes 9 and 22 by their distances
    paper = keyframe_neighbours(list(range(24)), keyframes, rule="paper")
    assert [keyframes[int(paper.past[12])], keyframes[int(paper.future[12])]] == [9, 22]
    assert dict(paper_pair(12, keyframes, "sigmoid")) == {22: pytest.approx(sigmoid(3 / 13)), 9: pytest.approx(1 - sigmoid(3 / 13))}


def test_released_rule_refuses_keyframes_outside_their_intervals():
    with pytest.raises(ValueError, match="one keyframe in each interval of 8"):
        keyframe_neighbours(list(range(24)), [3, 5, 22], rule="released", interval=8)
    with pytest.raises(ValueError, match="needs the keyframe interval"):
        keyframe_neighbours(list(range(24)), [3, 9, 22], rule="released")
    with pytest.raises(ValueError, match="tokenflow.propagation"):
        EditSettings(propagation="theirs")
    with pytest.raises(ValueError, match="fixed_keyframes"):
        EditSettings(mode="fixed_keyframes", propagation="released")


# ---------------------------------------------------------------------------------------------
# classifier-free guidance, with a stub UNet whose three branches return known values


class BranchStub(nn.Module):
    """Returns, for every frame, the mean of its text context: 0 for the source prompt, 1 for
    the negative prompt, 3 for the target prompt (so uncond = 1, cond = 3). Records its calls."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.conv_in = nn.Conv2d(4, 4, 1)  # only its dtype is read: the model's dtype

    def forward(self, x, t, context, control=None):
        self.calls.append({"x": x.clone(), "t": t, "context": context.clone(), "control": control})
        return context.mean(dim=(1, 2))[:, None, None, None].expand_as(x).clone()


def stub_prompts():
    return PromptEmbeddings(source=torch.zeros(1, 77, 8), negative=torch.ones(1, 77, 8), target=torch.full((1, 77, 8), 3.0))


@pytest.mark.parametrize("mode", ["per_frame", "tokenflow"])
@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_guidance_direction_and_scale(mode, scale):
    schedule = Schedule()
    t, t_prev = schedule.timesteps(10).tolist()[:2]
    latents = torch.randn(5, 4, 2, 2)
    settings = EditSettings(mode=mode, guidance_scale=scale, keyframe_interval=2, batch_size=2)
    keyframes = [0, 3, 4] if mode == "tokenflow" else None
    got = denoise_step(BranchStub(), schedule, settings, stub_prompts(), latents, torch.zeros_like(latents), t, t_prev,
                       settings.injection(0, 10), keyframes)
    eps = 1.0 + scale * (3.0 - 1.0)  # uncond + s (cond - uncond): 3 at s = 1, 16 at s = 7.5
    a_t, a_prev = schedule.alphas_cumprod[t].item(), schedule.alphas_cumprod[t_prev].item()
    x0 = (latents - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    want = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    assert torch.allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# what the keyframe pass and each propagation batch are given


def blend_weights(nb, row: int, keyframes: list[int]) -> dict[int, float]:
    """{keyframe: total weight} a frame's row of Neighbours gives (zero weights left out)."""
    weights: dict[int, float] = {}
    for slot, w in ((int(nb.future[row]), nb.w[row].item()), (int(nb.past[row]), 1 - nb.w[row].item())):
        weights[keyframes[slot]] = weights.get(keyframes[slot], 0.0) + w
    return {k: w for k, w in weights.items() if w != 0.0}


@pytest.mark.parametrize("reuse", [True, False])
def test_passes_receive_their_frames_prompts_and_neighbours(reuse):
    schedule = Schedule()
    t, t_prev = schedule.timesteps(10).tolist()[:2]
    n, keyframes = 7, [1, 3, 6]
    latents = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 4, 2, 2) + 100  # frame i: 100 + i
    source = -latents  # source frame i: -(100 + i)
    settings = EditSettings(mode="tokenflow", keyframe_interval=3, batch_size=3, reuse_keyframes=reuse)
    stub = BranchStub()
    prompts = stub_prompts()
    denoise_step(stub, schedule, settings, prompts, latents, source, t, t_prev, settings.injection(0, 10), keyframes)
    first, *rest = stub.calls
    k = len(keyframes)
    # keyframe pass: [source | uncond | cond] of exactly the keyframes, prompts in that order
    assert torch.equal(first["x"], torch.cat([source[keyframes], latents[keyframes], latents[keyframes]]))
    assert torch.equal(first["context"], torch.cat([p.expand(k, -1, -1) for p in (prompts.source, prompts.negative, prompts.target)]))
    assert first["t"] == t and first["control"].joint_frames == k and first["control"].record is not None
    # propagation passes: every frame once (the keyframes' steps come from the keyframe pass when
    # reused), in batches of 3, each with its own frames' neighbours
    propagated = [0, 2, 4, 5] if reuse else list(range(n))
    assert [c["x"].shape[0] for c in rest] == [3 * len(b) for b in edit.batches(len(propagated), 3)]
    seen = []
    for call in rest:
        x = call["x"]
        f = x.shape[0] // 3
        frames = [int(v) - 100 for v in x[f:2 * f, 0, 0, 0].tolist()]
        assert torch.equal(x[:f], source[frames]) and torch.equal(x[2 * f:], latents[frames])
        nb = call["control"].propagation.neighbours
        for row, i in enumerate(frames):
            assert blend_weights(nb, row, keyframes) == {k: pytest.approx(w) for k, w in paper_pair(i, keyframes, "sigmoid")}
        seen += frames
    assert seen == propagated


# ---------------------------------------------------------------------------------------------
# the loop's seam: what a LoopWatch is asked, and when


class ShareWatch(LoopWatch):
    """A process that owns frames 4..6 of 7 (as one torchrun rank would): it notes what the loop
    asks of it and fills the keyframe rows it does not own from `whole` (the other rank's values)."""

    def __init__(self, whole_latents, whole_source):
        super().__init__()
        self.whole_latents, self.whole_source = whole_latents, whole_source
        self.events = []

    def own_frames(self, n):
        return [4, 5, 6]

    def share_keyframes(self, latents, source, keyframes):
        self.events.append(("share", list(keyframes)))
        latents[keyframes], source[keyframes] = self.whole_latents[keyframes], self.whole_source[keyframes]

    def make_control(self, frames, **kwargs):
        self.events.append(("control", frames, kwargs.get("record") is not None))
        return super().make_control(frames, **kwargs)

    def forwarded(self, frames):
        self.events.append(("forward", list(frames)))
        super().forwarded(frames)

    def step_done(self, step, t, latents):
        self.events.append(("done", step, t))


def test_a_watch_that_owns_some_frames_gets_exactly_their_rows():
    schedule = Schedule()
    ts = schedule.timesteps(2).tolist()
    n, keyframes = 7, [1, 5]
    whole = torch.randn(n, 4, 2, 2)
    whole_source = torch.randn(n, 4, 2, 2)
    settings = EditSettings(mode="tokenflow", keyframe_interval=4, batch_size=2)
    t, t_prev = ts
    want = denoise_step(BranchStub(), schedule, settings, stub_prompts(), whole, whole_source, t, t_prev, settings.injection(0, 2), keyframes)
    mine = torch.full_like(whole, float("nan"))  # this process holds only its own rows
    mine[4:] = whole[4:]
    source = torch.full_like(whole, float("nan"))
    source[4:] = whole_source[4:]
    watch = ShareWatch(whole, whole_source)
    got = denoise_step(BranchStub(), schedule, settings, stub_prompts(), mine, source, t, t_prev, settings.injection(0, 2), keyframes, watch)
    torch.testing.assert_close(got[4:], want[4:], rtol=0, atol=0)
    # the keyframes are shared before the keyframe pass; then only own frames go through the UNet
    # (keyframe 5 takes its step from the keyframe pass: reuse)
    assert watch.events == [("share", [1, 5]), ("control", 2, True), ("forward", [1, 5]),
                            ("control", 2, False), ("forward", [4, 6])]
    assert watch.unet_frame_forwards == 4


def test_the_loop_reports_each_step_and_runs_only_own_frames():
    schedule = Schedule()
    ts = schedule.timesteps(3).tolist()
    n = 7
    source = {t: torch.randn(n, 4, 2, 2) for t in ts}
    clean = torch.randn(n, 4, 2, 2)
    watch = ShareWatch(torch.zeros(n, 4, 2, 2), torch.zeros(n, 4, 2, 2))
    settings = EditSettings(mode="per_frame", batch_size=2)
    latents, record = edit_video_latents(BranchStub(), schedule, settings, stub_prompts(), source, clean, ts, watch)
    assert [e for e in watch.events if e[0] == "done"] == [("done", i, t) for i, t in enumerate(ts)]
    assert [e[1] for e in watch.events if e[0] == "forward"] == [[4, 5], [6]] * len(ts)
    assert record.timesteps == ts and record.keyframes == []


def test_step_done_can_end_the_edit():
    class Stop(LoopWatch):
        def step_done(self, step, t, latents):
            if step == 1:
                raise KeyboardInterrupt

    schedule = Schedule()
    ts = schedule.timesteps(4).tolist()
    watch = Stop()
    with pytest.raises(KeyboardInterrupt):
        edit_video_latents(BranchStub(), schedule, EditSettings(mode="per_frame"), stub_prompts(),
                           {t: torch.randn(2, 4, 2, 2) for t in ts}, torch.randn(2, 4, 2, 2), ts, watch)
    assert watch.unet_frame_forwards == 2 * 2  # two steps of two frames ran, no more


def test_unknown_mode_is_refused_by_the_step():
    settings = EditSettings(mode="per_frame")
    settings.mode = "magic"  # past the settings' own check
    latents = torch.randn(2, 4, 2, 2)
    with pytest.raises(ValueError, match="unknown mode 'magic'"):
        denoise_step(BranchStub(), Schedule(), settings, stub_prompts(), latents, latents, 981, 961, settings.injection(0, 1), None)


# ---------------------------------------------------------------------------------------------
# PnP: which layers take the source's q/k and residuals, at which steps, in which branches


class Recorder(EditControl):
    """An EditControl that notes the path of the self-attention it is in, for the attention spy."""

    current: str = ""

    def self_attention(self, attn, x):
        Recorder.current = attn.path
        return super().self_attention(attn, x)

    def resnet_residual(self, path, h):
        out = super().resnet_residual(path, h)
        Recorder.residuals.append((path, h.clone(), out.clone()))
        return out


def test_pnp_replaces_qk_and_residuals_of_the_edited_branches_only(monkeypatch):
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).eval()
    f = 2
    calls = []  # (path, q, k, v) per attention() call made by EditControl

    def spy(q, k, v, heads, **kw):
        calls.append((Recorder.current, q.clone(), k.clone(), v.clone()))
        return real_attention(q, k, v, heads, **kw)

    real_attention = controls.attention
    monkeypatch.setattr(controls, "attention", spy)
    Recorder.residuals = []
    settings = EditSettings(mode="per_frame")
    pnp = settings.injection(0, 10)
    x = torch.randn(3 * f, 4, 8, 8)  # source, unconditional and conditional latents all differ
    with torch.no_grad():
        unet(x, 500, torch.randn(3 * f, 77, 64), Recorder(f, pnp=pnp))
    qk_paths = set()
    for j in range(0, len(calls), 2):  # each self-attention: the source call, then the edited call
        (path, q_s, k_s, v_s), (path_e, q_e, k_e, v_e) = calls[j], calls[j + 1]
        assert path == path_e and q_s.shape[0] == f and q_e.shape[0] == 2 * f
        injected = any(path.startswith(layer + ".") for layer in settings.pnp_qk_layers)
        source_qk = torch.equal(q_e, torch.cat([q_s, q_s])) and torch.equal(k_e, torch.cat([k_s, k_s]))
        assert source_qk == injected, path
        assert not torch.equal(v_e, torch.cat([v_s, v_s])), path  # values are never the source's
        if injected:
            qk_paths.add(path.split(".transformer_blocks")[0])
    assert qk_paths == set(settings.pnp_qk_layers)  # every listed layer, and only those
    for path, h, out in Recorder.residuals:
        if path in settings.pnp_feature_layers:
            assert torch.equal(out, torch.cat([h[:f]] * 3)), path  # both edited branches get the source's
        else:
            assert torch.equal(out, h), path  # nothing else is replaced
    assert {p for p, _, _ in Recorder.residuals} >= set(settings.pnp_feature_layers)


def test_pnp_injection_steps_over_an_edit(monkeypatch):
    """The loop asks for each step's injection: q/k for the first half of the steps, residual
    features for the first 80%, none for SDEdit."""
    seen = []

    def fake_step(unet, schedule, settings, prompts, latents, source, t, t_prev, pnp, keyframes, watch=None, **kwargs):
        seen.append((pnp.qk_layers, pnp.feature_layers))
        return latents

    monkeypatch.setattr(edit, "denoise_step", fake_step)
    schedule = Schedule()
    ts = schedule.timesteps(10).tolist()
    n = 3
    source = {t: torch.randn(n, 4, 2, 2) for t in ts}
    for method in ("pnp", "sdedit"):
        seen.clear()
        settings = EditSettings(method=method, mode="per_frame", sdedit_strength=1.0)
        edit_video_latents(None, schedule, settings, stub_prompts(), source, torch.randn(n, 4, 2, 2), ts)
        qk_steps = [i for i, (qk, _) in enumerate(seen) if qk]
        feature_steps = [i for i, (_, fe) in enumerate(seen) if fe]
        if method == "pnp":
            assert qk_steps == list(range(5)) and feature_steps == list(range(8))
            assert all(qk == settings.pnp_qk_layers for qk, _ in seen[:5])
        else:
            assert qk_steps == [] and feature_steps == []


# ---------------------------------------------------------------------------------------------
# SDEdit's start


def test_sdedit_start_shares_one_noise_map_at_the_strengths_timestep():
    schedule = Schedule()
    ts = schedule.timesteps(10).tolist()
    clean = torch.randn(4, 4, 8, 8)
    settings = EditSettings(method="sdedit", sdedit_strength=0.6, seed=3)
    x_t, remaining = edit_start(settings, schedule, ts, {}, clean)
    assert remaining == ts[4:]  # int(10 * 0.6) = 6 steps run, from the 5th timestep on
    a = schedule.alphas_cumprod[remaining[0]].item()
    noise = (x_t - math.sqrt(a) * clean) / math.sqrt(1 - a)  # x_t = sqrt(a) x0 + sqrt(1 - a) noise
    assert torch.allclose(noise, noise[:1].expand_as(noise), atol=1e-5)  # one map for every frame
    assert 0.8 < noise[0].std().item() < 1.2  # unit-variance noise, not a scaled copy of the latents
    again, _ = edit_start(settings, schedule, ts, {}, clean)
    assert torch.equal(again, x_t)  # seeded


# ---------------------------------------------------------------------------------------------
# keyframe reuse (paper rule): the same latents from n instead of n + K frame forwards per step


def test_keyframe_reuse_saves_forwards_and_changes_nothing():
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).eval()
    schedule = Schedule()
    ts = schedule.timesteps(3).tolist()
    n = 7
    source = {t: torch.randn(n, 4, 8, 8) for t in ts}
    prompts = PromptEmbeddings(*(torch.randn(1, 77, 64) for _ in range(3)))
    out, watches = {}, {}
    for reuse in (True, False):
        settings = EditSettings(keyframe_interval=3, batch_size=4, reuse_keyframes=reuse)
        watches[reuse] = LoopWatch()
        out[reuse] = edit_video_latents(unet, schedule, settings, prompts, source, torch.randn(n, 4, 8, 8), ts, watches[reuse])
    (latents_reused, rec_reused), (latents_full, rec_full) = out[True], out[False]
    assert rec_reused.keyframes == rec_full.keyframes
    keyframes = sum(len(k) for k in rec_full.keyframes)
    assert watches[False].unet_frame_forwards == 3 * n + keyframes
    assert watches[True].unet_frame_forwards == 3 * n
    # equal to float rounding (other batch compositions): 1e-5 of the latents' scale (up to ~10 here)
    assert (latents_reused - latents_full).abs().max().item() <= 1e-5 * latents_full.abs().max().item()
    # the released rule blends two groups' keyframes even at a keyframe: nothing to reuse there
    released = EditSettings(keyframe_interval=3, batch_size=4, propagation="released")
    watch = LoopWatch()
    edit_video_latents(unet, schedule, released, prompts, source, torch.randn(n, 4, 8, 8), ts, watch)
    assert watch.unet_frame_forwards == 3 * n + keyframes


# ---------------------------------------------------------------------------------------------
# small fixes: a clear error for a missing inverted timestep; no model call on an identity step


def test_missing_inverted_timestep_is_a_clear_error():
    schedule = Schedule()
    ts = schedule.timesteps(5).tolist()
    partial = {t: torch.randn(2, 4, 2, 2) for t in ts[1:]}  # the first timestep (PnP's start) is missing
    for method in ("pnp", "sdedit"):
        settings = EditSettings(method=method, mode="per_frame", sdedit_strength=1.0)
        with pytest.raises(ValueError, match=rf"no inverted latents for timesteps \[{ts[0]}\]"):
            edit_video_latents(None, schedule, settings, stub_prompts(), partial, torch.randn(2, 4, 2, 2), ts)


def test_1000_step_inversion_spends_no_model_call_on_its_identity_first_step():
    from sampler.ddim import invert, inversion_timesteps

    schedule = Schedule()  # final_alpha_cumprod = alpha_0: the step x0 -> t = 0 moves nothing
    calls = []

    def model_fn(x, t):
        calls.append(t)
        return 0.1 * x

    keep = schedule.timesteps(50).tolist()
    x0 = torch.randn(1, 4, 2, 2)
    kept = invert(model_fn, x0, schedule, 1000, keep)
    grid = inversion_timesteps(schedule, 1000, keep)
    assert grid[0] == 0 and len(calls) == len(grid) - 1 and 0 not in calls
    assert set(kept) == set(keep)
    calls.clear()
    invert(model_fn, x0, schedule, 50, keep)  # a 50-step grid starts at t = 1: a real step, called
    assert len(calls) == 50


# ---------------------------------------------------------------------------------------------
# the released rule's source branch: gathered through the NN field, no longer its own attention


def test_released_rule_propagates_the_source_branch():
    from tokenflow.controls import KeyframeTokens, Propagation
    from unet.model import SelfAttention

    torch.manual_seed(0)
    frames, n_tokens, channels = 3, 16, 8
    attn = SelfAttention(channels, heads=2, upcast=False).eval()
    attn.path = "up_blocks.3.attentions.2.transformer_blocks.0.attn1"
    tokens = KeyframeTokens([0, 2], record_source_outputs=True)
    tokens.source_inputs[attn.path] = torch.randn(2, n_tokens, channels)
    tokens.edited_outputs[attn.path] = torch.randn(2, 2, n_tokens, channels)
    tokens.source_outputs[attn.path] = torch.randn(2, n_tokens, channels)
    nb = keyframe_neighbours([0, 1, 2], [0, 2], rule="released", interval=2)
    x = torch.randn(3 * frames, n_tokens, channels)
    with torch.no_grad():
        released = EditControl(frames, propagation=Propagation(tokens, nb, propagate_source=True)).self_attention(attn, x)
        paper = EditControl(frames, propagation=Propagation(tokens, nb)).self_attention(attn, x)
    want_source = propagate(tokens.source_outputs[attn.path][None], tokens.source_inputs[attn.path], x[:frames], nb)[0]
    assert torch.equal(released[:frames], want_source)
    assert torch.allclose(paper[:frames], attn.plain(x[:frames]))  # the paper's: its own attention
    assert torch.equal(released[frames:], paper[frames:])  # the edited branches alike in both
    with pytest.raises(ValueError, match="recorded the source outputs"):
        Propagation(KeyframeTokens([0, 2]), nb, propagate_source=True)


def test_each_propagation_rule_runs_end_to_end(tmp_path):
    """A small run through run_edit with each rule: both finish, the rule reaches the edit."""
    import json

    from tokenflow.config import load_config
    from tokenflow.pipeline import run_edit

    finals = {}
    for rule in ("paper", "released"):
        cfg = load_config(["model=tiny", "progress=false", "frames.max=6", "size=64", "steps=3", "inversion.steps=3",
                              "tokenflow.keyframe_interval=3", f"tokenflow.propagation={rule}",
                              f"inversion.cache_dir={tmp_path / 'cache'}"])
        facts = run_edit(cfg, tmp_path / rule)
        finals[rule] = json.loads((tmp_path / rule / "run.json").read_text())
        assert facts.frames == 6 and (tmp_path / rule / "edited.mp4").is_file()
    # the paper's rule reuses the keyframe pass for the keyframes; the released rule cannot
    keyframes = sum(len(k) for k in finals["paper"]["keyframes_per_step"])
    assert finals["paper"]["unet_frame_forwards"] == 3 * 6
    assert finals["released"]["unet_frame_forwards"] == 3 * 6 + keyframes


def test_neighbours_reach_the_latents_device_once_per_step():
    """The neighbour tables are built on the CPU; the propagation batches must get them on the
    latents' device (indexing device tokens with CPU indices copies host-to-device in every layer).
    The meta device stands in for CUDA."""
    schedule = Schedule()
    t, t_prev = schedule.timesteps(10).tolist()[:2]
    latents = torch.randn(7, 4, 2, 2, device="meta")
    settings = EditSettings(mode="tokenflow", keyframe_interval=3, batch_size=3)
    stub = BranchStub().to("meta")
    prompts = PromptEmbeddings(*(p.to("meta") for p in (torch.zeros(1, 77, 8), torch.ones(1, 77, 8), torch.ones(1, 77, 8))))
    denoise_step(stub, schedule, settings, prompts, latents, latents, t, t_prev, settings.injection(0, 10), [1, 3, 6])
    tables = [c["control"].propagation.neighbours for c in stub.calls[1:]]
    assert tables and all(nb.past.device.type == nb.future.device.type == nb.w.device.type == "meta" for nb in tables)
