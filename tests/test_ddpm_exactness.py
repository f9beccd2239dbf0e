"""Edit-friendly DDPM inversion is exact through the whole edit loop; DDIM inversion is not.

The setting: a tiny UNet with seeded random weights, 2 frames of 8x8 latents, the target prompt
equal to the source prompt and the edit's guidance equal to the inversion's, `per_frame` mode.
The inversion's model (written out here, not taken from edit.py) is classifier-free guidance of the
source prompt against the negative prompt, which is what the loop's conditional and unconditional
branches compute in that setting. Then sampling with the stored noise maps through
`edit_video_latents` passes through every noisy version x_t of the inversion and ends on the clean
latents, to float rounding, at any step count: each map z_t was measured as exactly what carries
the step's mean mu_t(x_t) to the next noisy version.

PnP with the maps stays exact in two ways, both tested:
- guidance 1 with the default injection: the guided output is the conditional branch alone, and
  that branch's input (x_t, the source prompt) is the source branch's own, so the q/k and features
  PnP copies into it are the ones it computes anyway (the unconditional branch, which injection
  does change, has weight 0);
- another guidance (3.5, a common source scale) with the injection fractions 0: with injection the
  unconditional branch would take the source branch's features and leave the inversion's model.

DDIM inversion + DDIM sampling of the same model does not come back (its inversion assumes the
model output at x_t equals that at the next timestep's latent), and the fewer the steps, the
further it lands.
"""

import pytest
import torch

from sampler import Schedule, ddpm_invert, draw_version_noise, invert
from tokenflow.edit import EditSettings, LoopWatch, PromptEmbeddings, edit_video_latents
from unet import UNet, UNetConfig

FRAMES, SHAPE = 2, (2, 4, 8, 8)
EXACT = 1e-4  # float32 rounding, carried through 50 steps of latents up to ~4 (an ulp there is 5e-7)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).eval()
    source_prompt, negative = torch.randn(1, 77, 64), torch.randn(1, 77, 64)
    clean = torch.randn(SHAPE)
    return unet, source_prompt, negative, clean


def inversion_model(unet, source_prompt, negative, scale):
    """The guided output the maps are measured with: negative + scale (source - negative)."""

    def model_fn(x, t):
        n = x.shape[0]
        context = torch.cat([negative.expand(n, -1, -1), source_prompt.expand(n, -1, -1)])
        uncond, cond = unet(torch.cat([x, x]), t, context).chunk(2)  # [2n, ...] -> 2 x [n, ...]
        return uncond + scale * (cond - uncond)

    return model_fn


class StepLatents(LoopWatch):
    """Keeps the latents after each step: {the timestep the step started from: latents}."""

    def __init__(self):
        super().__init__()
        self.after = {}

    def step_done(self, step, t, latents):
        self.after[t] = latents.clone()


def reconstruct(setup, steps, guidance, *, inversion="ddpm", skip=0, method="pnp", **settings):
    """Invert the clip (DDPM or DDIM) and sample it back with the source prompt as the target.
    Returns (edited clean latents, the watch, the inversion's {t: x_t}, the grid)."""
    unet, source_prompt, negative, clean = setup
    schedule = Schedule()
    ts = schedule.timesteps(steps).tolist()
    model_fn = inversion_model(unet, source_prompt, negative, guidance)
    with torch.no_grad():
        if inversion == "ddpm":
            noise = draw_version_noise(SHAPE, ts, torch.Generator().manual_seed(1))
            xs, maps = ddpm_invert(model_fn, clean, schedule, ts, noise)
        else:
            xs, maps = invert(model_fn, clean, schedule, steps, ts), None
    edit = EditSettings(mode="per_frame", method=method, inversion=inversion, skip=skip, guidance_scale=guidance,
                        batch_size=FRAMES, **settings)
    watch = StepLatents()
    out, record = edit_video_latents(unet, schedule, edit, PromptEmbeddings(source_prompt, negative, source_prompt),
                                     xs, clean, ts, watch, noise_maps=maps)
    assert record.timesteps == [t for t in ts if t in watch.after]
    return out, watch, xs, ts


def core_at(steps):
    """The 10-step runs are part of `pytest -m core`; the 50-step ones take seconds more."""
    return pytest.param(steps, marks=pytest.mark.core) if steps == 10 else steps


@pytest.mark.parametrize("steps", [core_at(10), core_at(50)])
@pytest.mark.parametrize("guidance,fractions", [(1.0, None), (3.5, 0.0)], ids=["guidance1-pnp", "guidance3.5-no-injection"])
def test_ddpm_maps_reconstruct_every_noisy_version_and_the_clean_latents(setup, steps, guidance, fractions):
    clean = setup[3]
    injection = {} if fractions is None else {"pnp_qk_fraction": fractions, "pnp_feature_fraction": fractions}
    out, watch, xs, ts = reconstruct(setup, steps, guidance, **injection)
    assert sorted(watch.after, reverse=True) == ts  # every step ran
    worst = max((watch.after[t] - xs[t_next]).abs().max().item() for t, t_next in zip(ts, ts[1:]))
    assert worst <= EXACT  # after the step from t, the latents are the inversion's x at the next timestep
    assert (out - clean).abs().max().item() <= EXACT


@pytest.mark.core
@pytest.mark.parametrize("method,extra", [("pnp", {"skip": 3}), ("sdedit", {"sdedit_strength": 0.6})])
def test_ddpm_edits_that_start_later_are_exact_too(setup, method, extra):
    """PnP with skip starts at the inversion's x_t after the skipped steps; SDEdit under DDPM at the
    inversion's x_t at the strength's step (no fresh noise): both sample back the clean latents."""
    out, watch, xs, ts = reconstruct(setup, 10, 1.0, method=method, **extra)
    first = 4 if method == "sdedit" else 3  # int(10 * 0.6) = 6 steps run; skip 3
    assert sorted(watch.after, reverse=True) == ts[first:]
    assert (out - setup[3]).abs().max().item() <= EXACT


@pytest.mark.core
def test_ddpm_maps_of_another_guidance_do_not_reconstruct(setup):
    """Exactness needs the inversion's own model: the edit at guidance 7.5 with maps measured at 1
    lands far off (so the tests above can fail)."""
    unet, source_prompt, negative, clean = setup
    schedule = Schedule()
    ts = schedule.timesteps(10).tolist()
    with torch.no_grad():
        xs, maps = ddpm_invert(inversion_model(unet, source_prompt, negative, 1.0), clean, schedule, ts,
                               draw_version_noise(SHAPE, ts, torch.Generator().manual_seed(1)))
    edit = EditSettings(mode="per_frame", inversion="ddpm", guidance_scale=7.5, batch_size=FRAMES)
    out, _ = edit_video_latents(unet, schedule, edit, PromptEmbeddings(source_prompt, negative, source_prompt),
                                xs, clean, ts, noise_maps=maps)
    assert (out - clean).abs().max().item() > 1e-2


def test_ddim_does_not_reconstruct_and_fewer_steps_land_further(setup):
    """The same model, prompts and loop, DDIM inversion instead: the reconstruction is off by far
    more than rounding, and its RMS error at 10 steps exceeds that at 50."""
    clean = setup[3]
    rms = {}
    for steps in (10, 50):
        out, _, _, _ = reconstruct(setup, steps, 1.0, inversion="ddim")
        rms[steps] = (out - clean).pow(2).mean().sqrt().item()
    assert rms[50] > 100 * EXACT
    assert rms[10] > 1.2 * rms[50]
