"""The project's denoising step (tokenflow.edit.denoise_step) against an independent oracle of
Alg. 1 (tests/oracle_alg1.py), in every mode, editing technique and propagation rule, with the DDIM
step and with the DDPM step of a noise map (edit-friendly DDPM inversion).

The clip: 11 frames, keyframe interval 3, keyframes [1, 4, 7, 9]: a frame before the first
keyframe (0), after the last (10), frames nearer one side than the other, a last group shorter than
the interval, and propagation batches of 4 that do not divide the clip.
"""

import pytest
import torch

from oracle_alg1 import OracleControlNet, OracleSettings, oracle_step
from sampler.schedule import Schedule
from tokenflow.controlnet_guide import ControlNetGuide
from tokenflow.edit import EditSettings, PromptEmbeddings, denoise_step
from tokenflow.keyframes import fixed_keyframes
from unet import UNet, UNetConfig
from unet.controlnet import ControlNet

pytestmark = pytest.mark.core

N_FRAMES, INTERVAL, STEPS = 11, 3, 10
KEYFRAMES = [1, 4, 7, 9]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).eval()
    # a "video": one latent image panning a pixel per frame (plus a little noise), so a frame's NN
    # field differs from keyframe to keyframe (a swapped or misdirected field shows), yet is not random
    base = torch.randn(4, 8, 8)
    source = torch.stack([torch.roll(base, shifts=i, dims=-1) for i in range(N_FRAMES)]) + 0.1 * torch.randn(N_FRAMES, 4, 8, 8)
    latents = source + 0.5 * torch.randn(N_FRAMES, 4, 8, 8)  # the edit has moved away from the source
    prompts = tuple(torch.randn(1, 77, 64) for _ in range(3))  # source, negative, target
    return unet, source, latents, prompts


def injected_layers(settings: EditSettings, step: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """PnP for step `step` of STEPS, from the method's definition: q/k during the first
    qk_fraction of the steps, residual features during the first feature_fraction."""
    if settings.method != "pnp":
        return (), ()
    qk = settings.pnp_qk_layers if step < int(STEPS * settings.pnp_qk_fraction) else ()
    features = settings.pnp_feature_layers if step < int(STEPS * settings.pnp_feature_fraction) else ()
    return qk, features


CASES = [
    # mode, method, rule, weighting, step, prediction type, sampler step
    ("tokenflow", "pnp", "paper", "sigmoid", 0, "epsilon", "ddim"),  # q/k and residual injection
    ("tokenflow", "pnp", "paper", "sigmoid", 6, "epsilon", "ddim"),  # residual injection only
    ("tokenflow", "pnp", "paper", "linear", 9, "epsilon", "ddim"),  # no injection left
    ("tokenflow", "sdedit", "paper", "sigmoid", 0, "epsilon", "ddim"),
    ("tokenflow", "pnp", "released", "sigmoid", 0, "epsilon", "ddim"),
    ("tokenflow", "sdedit", "released", "sigmoid", 3, "epsilon", "ddim"),
    ("fixed_keyframes", "pnp", "paper", "sigmoid", 0, "epsilon", "ddim"),
    ("per_frame", "pnp", "paper", "sigmoid", 0, "epsilon", "ddim"),
    ("per_frame", "sdedit", "paper", "sigmoid", 2, "epsilon", "ddim"),
    ("extended_all", "pnp", "paper", "sigmoid", 0, "epsilon", "ddim"),
    ("tokenflow", "pnp", "paper", "sigmoid", 0, "v_prediction", "ddim"),
    # the DDPM step: keyframes' steps from the keyframe pass (reuse), propagation batches, each mode
    ("tokenflow", "pnp", "paper", "sigmoid", 0, "epsilon", "ddpm"),
    ("tokenflow", "pnp", "paper", "linear", 9, "epsilon", "ddpm"),  # the last step, to final_alpha_cumprod
    ("tokenflow", "sdedit", "released", "sigmoid", 3, "epsilon", "ddpm"),
    ("fixed_keyframes", "pnp", "paper", "sigmoid", 6, "epsilon", "ddpm"),
    ("per_frame", "pnp", "paper", "sigmoid", 0, "epsilon", "ddpm"),
    ("extended_all", "sdedit", "paper", "sigmoid", 2, "epsilon", "ddpm"),
    ("tokenflow", "pnp", "paper", "sigmoid", 0, "v_prediction", "ddpm"),
]


@pytest.mark.parametrize("mode,method,rule,weighting,step,prediction,sampler", CASES)
def test_denoise_step_equals_the_oracle(clip, mode, method, rule, weighting, step, prediction, sampler):
    unet, source, latents, prompts = clip
    # a different map per frame: a frame stepped with another frame's row (or none) shows
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(11)) if sampler == "ddpm" else None
    schedule = Schedule(prediction_type=prediction)
    timesteps = schedule.timesteps(STEPS).tolist()
    t = timesteps[step]
    t_prev = timesteps[step + 1] if step + 1 < STEPS else -1
    settings = EditSettings(mode=mode, method=method, propagation=rule, weighting=weighting,
                            keyframe_interval=INTERVAL, batch_size=4, guidance_scale=7.5)
    keyframes = {"tokenflow": KEYFRAMES, "fixed_keyframes": fixed_keyframes(N_FRAMES, INTERVAL)}.get(mode)
    qk, features = injected_layers(settings, step)
    oracle = OracleSettings(mode=mode, guidance_scale=7.5, weighting=weighting, rule=rule, interval=INTERVAL,
                            qk_layers=qk, feature_layers=features)
    with torch.no_grad():
        want = oracle_step(unet, schedule, oracle, prompts, latents, source, t, t_prev, keyframes, noise)
        got = denoise_step(unet, schedule, settings, PromptEmbeddings(*prompts), latents, source, t, t_prev,
                           settings.injection(step, STEPS), keyframes, noise=noise)
    assert got.shape == want.shape
    # float32 rounding, relative to the size of the result (|x_prev| up to ~7.5 here: 1e-5 is 20 ulps)
    assert (got - want).abs().max().item() <= max(1e-5, 2e-6 * want.abs().max().item())


def test_the_oracle_tells_the_cases_apart(clip):
    """The comparison above can only catch a bug if the cases differ by far more than 1e-5."""
    unet, source, latents, prompts = clip
    schedule = Schedule()
    t, t_prev = schedule.timesteps(STEPS).tolist()[:2]
    pnp = EditSettings().pnp_qk_layers, EditSettings().pnp_feature_layers

    def run(noise=None, **kw):
        s = OracleSettings(**{"mode": "tokenflow", "interval": INTERVAL, **kw})
        with torch.no_grad():
            return oracle_step(unet, schedule, s, prompts, latents, source, t, t_prev, KEYFRAMES, noise)

    base = run(qk_layers=pnp[0], feature_layers=pnp[1])
    variants = {
        "no q/k injection": run(feature_layers=pnp[1]),
        "no residual injection": run(qk_layers=pnp[0]),
        "released rule": run(qk_layers=pnp[0], feature_layers=pnp[1], rule="released"),
        "linear weights": run(qk_layers=pnp[0], feature_layers=pnp[1], weighting="linear"),
        "guidance 1": run(qk_layers=pnp[0], feature_layers=pnp[1], guidance_scale=1.0),
        "per frame": run(mode="per_frame", qk_layers=pnp[0], feature_layers=pnp[1]),
    }
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(11))
    ddpm = {
        "own maps": run(qk_layers=pnp[0], feature_layers=pnp[1], noise=noise),
        "neighbours' maps": run(qk_layers=pnp[0], feature_layers=pnp[1], noise=noise[torch.arange(N_FRAMES).roll(1)]),
    }
    variants["DDPM step"] = ddpm["own maps"]
    for name, other in variants.items():
        assert (other - base).abs().max().item() > 1e-3, name
    assert (ddpm["neighbours' maps"] - ddpm["own maps"]).abs().max().item() > 1e-3  # a frame stepped with another's map shows


def drawn_controlnet(cfg: UNetConfig, seed: int) -> ControlNet:
    """A ControlNet with every weight drawn, its zero convolutions included (else it would add nothing)."""
    torch.manual_seed(seed)
    model = ControlNet(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


CONTROLNET_CASES = [
    # mode, method, rule, step, conditioning scale, frames per ControlNet forward
    ("tokenflow", "pnp", "paper", 0, 1.0, None),  # PnP injection and ControlNet together
    ("tokenflow", "sdedit", "released", 3, 0.7, 3),  # the released rule propagates the source branch too
    ("fixed_keyframes", "sdedit", "paper", 2, 1.0, 2),
    ("per_frame", "pnp", "paper", 0, 1.5, None),
    ("extended_all", "sdedit", "paper", 1, 1.0, 4),  # 11 frames in ControlNet chunks of 4
]


@pytest.fixture(scope="module")
def controlnet_clip(clip):
    unet = clip[0]
    model = drawn_controlnet(unet.config, seed=1)
    conditions = (torch.rand(N_FRAMES, 3, 64, 64) > 0.8).float()  # an edge-like map per frame, 8x the latents
    return model, conditions


@pytest.mark.parametrize("mode,method,rule,step,scale,chunk", CONTROLNET_CASES)
def test_controlnet_step_equals_the_oracle(clip, controlnet_clip, mode, method, rule, step, scale, chunk):
    unet, source, latents, prompts = clip
    model, conditions = controlnet_clip
    schedule = Schedule()
    timesteps = schedule.timesteps(STEPS).tolist()
    t, t_prev = timesteps[step], timesteps[step + 1]
    settings = EditSettings(mode=mode, method=method, propagation=rule, keyframe_interval=INTERVAL, batch_size=4)
    keyframes = {"tokenflow": KEYFRAMES, "fixed_keyframes": fixed_keyframes(N_FRAMES, INTERVAL)}.get(mode)
    qk, features = injected_layers(settings, step)
    oracle = OracleSettings(mode=mode, rule=rule, interval=INTERVAL, qk_layers=qk, feature_layers=features)
    with torch.no_grad():
        want = oracle_step(unet, schedule, oracle, prompts, latents, source, t, t_prev, keyframes,
                           controlnet=OracleControlNet(model, conditions, scale))
        without = oracle_step(unet, schedule, oracle, prompts, latents, source, t, t_prev, keyframes)
        got = denoise_step(unet, schedule, settings, PromptEmbeddings(*prompts), latents, source, t, t_prev,
                           settings.injection(step, STEPS), keyframes,
                           controlnet=ControlNetGuide(model, conditions, scale=scale, chunk=chunk))
    assert (want - without).abs().max().item() > 1e-2  # the ControlNet changes this step
    assert (got - want).abs().max().item() <= 1e-5
