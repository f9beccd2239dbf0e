"""The TokenFlow sampling loop (paper Alg. 1), on latents. I/O-free: the pipeline reads and writes the video.

At each denoising step t (Alg. 1):
  1. sample keyframe indices (keyframes.py);
  2. keyframe pass: the keyframes alone, edited jointly with extended attention (Eq. 3-4), recording
     T_base and the original video's self-attention inputs at every self-attention layer;
  3. propagation pass: all frames in batches; each self-attention layer of the edited branches
     outputs Eq. 6 of the recorded tokens through the NN field (Eq. 5) of the original features;
  4. DDIM step of every frame with classifier-free guidance.
The editing technique (PnP-Diffusion or SDEdit) acts through the same passes (controls.py); a
ControlNet (controlnet_guide.py), when given, adds each pass's own frames' residuals to the edited
branches on the steps of its window.

Inversion (`inversion.method=`): `ddim` (the paper) hands the loop the DDIM-inverted latents of the
original video; `ddpm` (edit-friendly DDPM inversion, sampler/ddpm.py) hands it the noisy versions
x_t and the noise maps z_t, and step 4 becomes the DDPM step x_prev = mu_t + sigma_t z_t with each
frame's own row of the step's map, in every pass. Either way `source_latents[t]` is the original
video's x_t that the source branch sees at step t. `inversion.skip` starts the edit after the
first `skip` sampling steps, at the inversion's own latents there.
Whoever distributes the loop (torchrun's frame shares) or watches it (progress, feature capture,
counting forwards) does so through one `LoopWatch`, never through the step's own parameters.

Modes (the paper's ablations, `tokenflow.mode=`): `tokenflow` (default), `fixed_keyframes` (same
evenly spaced keyframes every step), `per_frame` (the editing technique on each frame alone) and
`extended_all` ("w/o TokenFlow": extended attention across all frames, no propagation).
Propagation rules (`tokenflow.propagation=`): `paper` (Eq. 6-7 as printed) or `released` (the
authors' released code: group-centre weights, source branch propagated too); see propagation.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sampler.ddim import add_noise, classifier_free_guidance, ddim_step, sdedit_first_step, state_dtype
from sampler.ddpm import ddpm_step
from sampler.schedule import Schedule
from unet.control import ControlResiduals
from unet.model import UNet

from .config import (
    EDIT_MODES, METHODS, PNP_FEATURE_LAYERS, PNP_QK_LAYERS, ConfigError, InversionConfig, PnPConfig, RunConfig,
    SDEditConfig, TokenFlowConfig,
)
from .controls import EditControl, KeyframeTokens, PnPInjection, Propagation
from .keyframes import fixed_keyframes, random_keyframes
from .propagation import keyframe_neighbours

if TYPE_CHECKING:
    from .controlnet_guide import ControlNetGuide
    from .distributed import FrameShard


@dataclass
class EditSettings:
    """What Alg. 1's loop needs of a run's settings, flattened. Every default and every check is
    tokenflow.config's (the fields below name their source); `from_config` reads a RunConfig."""

    mode: str = TokenFlowConfig.mode  # one of config.EDIT_MODES (reconstruction runs no loop)
    method: str = PnPConfig.name  # pnp | sdedit
    guidance_scale: float = RunConfig.guidance_scale
    keyframe_interval: int = TokenFlowConfig.keyframe_interval
    weighting: str = TokenFlowConfig.weighting  # Eq. 7 as printed; "linear": w = d- / (d+ + d-)
    propagation: str = TokenFlowConfig.propagation  # "paper" (Eq. 6-7) or "released" (authors' code)
    reuse_keyframes: bool = TokenFlowConfig.reuse_keyframes  # paper rule: a keyframe's step comes from the keyframe pass
    batch_size: int = TokenFlowConfig.batch_size  # frames per forward in the propagation / per-frame passes
    seed: int = RunConfig.seed
    pnp_qk_fraction: float = PnPConfig.qk_fraction  # q/k injection for this first fraction of the steps
    pnp_feature_fraction: float = PnPConfig.feature_fraction  # residual feature injection, likewise
    pnp_qk_layers: tuple[str, ...] = tuple(PNP_QK_LAYERS)
    pnp_feature_layers: tuple[str, ...] = tuple(PNP_FEATURE_LAYERS)
    sdedit_strength: float = SDEditConfig.strength
    query_chunk: int | None = TokenFlowConfig.query_chunk  # bound the extended attention's score matrix (None: SDPA decides)
    inversion: str = InversionConfig.method  # ddim: deterministic steps | ddpm: DDPM steps with the inversion's noise maps
    skip: int = InversionConfig.skip  # the edit starts after this many sampling steps (SDEdit: or later, at its strength's)

    def __post_init__(self):
        # the config's own checks, so a bad value reads the same (naming the override) wherever it is set
        tokenflow = TokenFlowConfig(
            mode=self.mode, keyframe_interval=self.keyframe_interval, weighting=self.weighting,
            propagation=self.propagation, reuse_keyframes=self.reuse_keyframes, batch_size=self.batch_size,
            query_chunk=self.query_chunk,
        )
        if self.mode not in EDIT_MODES:
            raise ConfigError(f"tokenflow.mode={self.mode} runs no edit loop (it only encodes and decodes); "
                              f"the loop's modes are {', '.join(EDIT_MODES)}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method} (choose one of {', '.join(METHODS)})")
        # both techniques' values are checked whichever runs: a bad one fails now, not when it is switched on
        pnp = PnPConfig(qk_fraction=self.pnp_qk_fraction, feature_fraction=self.pnp_feature_fraction,
                        qk_layers=list(self.pnp_qk_layers), feature_layers=list(self.pnp_feature_layers))
        sdedit = SDEditConfig(strength=self.sdedit_strength)
        InversionConfig(method=self.inversion, skip=self.skip)  # skip < steps is checked where the steps are known
        RunConfig(seed=self.seed, guidance_scale=self.guidance_scale, tokenflow=tokenflow,
                  method=pnp if self.method == "pnp" else sdedit)
        self.pnp_qk_layers, self.pnp_feature_layers = tuple(self.pnp_qk_layers), tuple(self.pnp_feature_layers)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> EditSettings:
        """The loop's settings of a run (cfg.tokenflow, cfg.method, cfg.guidance_scale, cfg.seed, cfg.inversion)."""
        tf, method = cfg.tokenflow, cfg.method
        pnp = method if isinstance(method, PnPConfig) else PnPConfig()
        sdedit = method if isinstance(method, SDEditConfig) else SDEditConfig()
        return cls(
            mode=tf.mode, method=method.name, guidance_scale=cfg.guidance_scale, keyframe_interval=tf.keyframe_interval,
            weighting=tf.weighting, propagation=tf.propagation, reuse_keyframes=tf.reuse_keyframes,
            batch_size=tf.batch_size, seed=cfg.seed, pnp_qk_fraction=pnp.qk_fraction,
            pnp_feature_fraction=pnp.feature_fraction, pnp_qk_layers=tuple(pnp.qk_layers),
            pnp_feature_layers=tuple(pnp.feature_layers), sdedit_strength=sdedit.strength, query_chunk=tf.query_chunk,
            inversion=cfg.inversion.method, skip=cfg.inversion.skip,
        )

    def injection(self, step: int, n_steps: int) -> PnPInjection:
        """PnP injects for the first fraction of the steps; SDEdit never. `step` counts in the whole
        sampling grid of `n_steps` (a run that skips steps still injects at the same timesteps)."""
        if self.method != "pnp":
            return PnPInjection()
        return PnPInjection(
            qk_layers=self.pnp_qk_layers if step < int(n_steps * self.pnp_qk_fraction) else (),
            feature_layers=self.pnp_feature_layers if step < int(n_steps * self.pnp_feature_fraction) else (),
        )


@dataclass
class PromptEmbeddings:
    """Text embeddings [1, 77, C] of the three branches."""

    source: Tensor  # the inversion prompt (often empty): conditions the original video's branch
    negative: Tensor  # unconditional branch of classifier-free guidance
    target: Tensor  # the edit prompt


@dataclass
class EditRecord:
    """What Alg. 1 decided during an edit."""

    keyframes: list[list[int]] = field(default_factory=list)  # per step (TokenFlow modes)
    timesteps: list[int] = field(default_factory=list)  # the steps run, in order


class LoopWatch:
    """How a caller drives or watches Alg. 1's loop: the one seam between the algorithm and whatever
    distributes it (torchrun's frame shares) or observes it (progress, feature capture, counting).
    The defaults: one process, nobody watching. Subclass and override what you need."""

    def __init__(self, shard: FrameShard | None = None):
        self.shard = shard  # distributed.FrameShard under torchrun: this process's frames
        self.unet_frame_forwards = 0  # frames through the UNet (each with its 3 branches), all steps
        self.controlnet_frame_forwards = 0  # frames through the ControlNet (each with its 2 edited branches)

    def own_frames(self, n: int) -> list[int]:
        """The rows this process computes in the propagation / per-frame pass (of n frames)."""
        return list(range(n)) if self.shard is None else list(self.shard.frames)

    def share_keyframes(self, latents: Tensor, source: Tensor, keyframes: list[int]) -> None:
        """Before a step's keyframe pass: the keyframes' rows of `latents` and `source` [n, 4, h, w]
        must hold their values on this process (torchrun: filled from the ranks owning them)."""
        if self.shard is not None:
            self.shard.share_keyframes(latents, source, keyframes)

    def make_control(self, frames: int, **kwargs) -> EditControl:
        """Every pass's control is built here (a tool that records tokens returns a subclass)."""
        return EditControl(frames, **kwargs)

    def forwarded(self, frames: list[int]) -> None:
        """Once per UNet forward, with the frames it carried."""
        self.unet_frame_forwards += len(frames)

    def controlnet_forwarded(self, frames: list[int]) -> None:
        """Once per ControlNet forward, with the frames it carried."""
        self.controlnet_frame_forwards += len(frames)

    def step_done(self, step: int, t: int, latents: Tensor) -> None:
        """After each denoising step, with the latents it produced (progress bars tick here; raising
        ends the edit, e.g. KeyboardInterrupt)."""


def require_inverted(source_latents: dict[int, Tensor], timesteps: list[int]) -> None:
    """Every sampling timestep needs the original video's inverted latents (the source branch)."""
    missing = [t for t in timesteps if t not in source_latents]
    if missing:
        raise ValueError(f"edit: no inverted latents for timesteps {missing[:5]} (invert with these sampling timesteps kept)")


def first_step(settings: EditSettings, n_steps: int) -> int:
    """Where in the sampling grid of `n_steps` the edit starts: after the first `skip` steps; SDEdit
    at the later of that and its strength's step (sampler.ddim.sdedit_first_step, as sdedit_start)."""
    if settings.skip >= n_steps:
        raise ValueError(f"edit: inversion.skip={settings.skip} skips all {n_steps} sampling steps; at least one must run")
    if settings.method != "sdedit":
        return settings.skip
    first = sdedit_first_step(n_steps, settings.sdedit_strength)
    if first == n_steps:
        raise ValueError(f"edit: method.strength={settings.sdedit_strength} of {n_steps} steps leaves no step to run; raise it")
    return max(settings.skip, first)


def edit_start(
    settings: EditSettings, schedule: Schedule, timesteps: list[int], source_latents: dict[int, Tensor],
    clean_latents: Tensor,
) -> tuple[Tensor, list[int]]:
    """Where sampling starts (first_step) and the steps that remain.
    PnP: the inversion's latents of the original video at the first step (x_T when nothing is skipped).
    SDEdit under DDIM inversion: the clean latents noised to the first step's timestep, one noise map
    shared by every frame (seeded), so the frames start alike. SDEdit under DDPM inversion: the
    inversion's own noisy version x_t there, no fresh noise: the stored maps belong to those x_t."""
    dtype = state_dtype(clean_latents.dtype)  # the sampler's state is float32 whatever the model's dtype
    first = first_step(settings, len(timesteps))
    remaining = list(timesteps[first:])
    if settings.method == "sdedit" and settings.inversion == "ddim":
        clean = clean_latents.to(dtype)
        g = torch.Generator().manual_seed(settings.seed + 1)
        noise = torch.randn((1, *clean.shape[1:]), generator=g).to(clean)
        return add_noise(schedule, clean, noise.expand_as(clean), int(remaining[0])), remaining
    require_inverted(source_latents, remaining)  # before the lookup: a clear error, not a KeyError
    return source_latents[remaining[0]].to(clean_latents.device, dtype, copy=True), remaining


def require_noise_maps(settings: EditSettings, noise_maps: dict[int, Tensor] | None, timesteps: list[int],
                       shape: tuple[int, ...]) -> None:
    """DDPM inversion's edit needs a noise map [n, 4, h, w] for every step it runs; DDIM's takes none."""
    if settings.inversion == "ddim":
        if noise_maps is not None:
            raise ValueError("edit: noise maps were given but inversion.method=ddim samples without them; "
                             "set inversion.method=ddpm")
        return
    if noise_maps is None:
        raise ValueError("edit: inversion.method=ddpm samples with the inversion's noise maps; none were given")
    missing = [t for t in timesteps if t not in noise_maps]
    if missing:
        raise ValueError(f"edit: no noise maps for timesteps {missing[:5]} (invert with inversion.method=ddpm on this grid)")
    bad = [t for t in timesteps if tuple(noise_maps[t].shape) != tuple(shape)]
    if bad:
        raise ValueError(f"edit: the noise map at t={bad[0]} has shape {tuple(noise_maps[bad[0]].shape)}, "
                         f"the latents {tuple(shape)}")


def guided_output(
    unet: UNet, edited: Tensor, source: Tensor, t: int, prompts: PromptEmbeddings, control: EditControl, scale: float,
    *, residuals: ControlResiduals | None = None,
) -> Tensor:
    """One UNet forward over [source | unconditional | conditional] x F frames -> guided output [F, ...].
    `residuals`: a ControlNet's, batch 3F in the same branch order (controlnet_guide.py)."""
    f = edited.shape[0]
    x = torch.cat([source, edited, edited]).to(unet.conv_in.weight.dtype)  # [3F, 4, h, w]; float32 state -> model dtype
    context = torch.cat([prompts.source.expand(f, -1, -1), prompts.negative.expand(f, -1, -1), prompts.target.expand(f, -1, -1)])
    _, uncond, cond = unet(x, t, context.to(x.dtype), control, residuals=residuals).chunk(3)
    dtype = state_dtype(uncond.dtype)  # guidance (eps arithmetic) in float32, like the DDIM step after it
    return classifier_free_guidance(uncond.to(dtype), cond.to(dtype), scale)


def batches(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


def keyframes_at(settings: EditSettings, n: int, step: int) -> list[int] | None:
    """The keyframes of denoising step `step` (None in the modes without keyframes). The random
    draw comes from a generator seeded with (seed, step), so a step's keyframes are a pure function
    of the settings: a seeded run repeats them, and a tool can ask for any step's draw."""
    if settings.mode == "tokenflow":
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
        return random_keyframes(n, settings.keyframe_interval, generator)
    if settings.mode == "fixed_keyframes":
        return fixed_keyframes(n, settings.keyframe_interval)
    return None


def denoise_step(
    unet: UNet, schedule: Schedule, settings: EditSettings, prompts: PromptEmbeddings, latents: Tensor, source: Tensor,
    t: int, t_prev: int, pnp: PnPInjection, keyframes: list[int] | None, watch: LoopWatch | None = None, *,
    noise: Tensor | None = None, controlnet: ControlNetGuide | None = None,
) -> Tensor:
    """One step of Alg. 1 for every frame of `latents` [n, 4, h, w] (source: the original video's
    x_t, same shape) -> the latents at t_prev. `watch` builds the passes' controls and sees each
    forward; under torchrun it names this process's rows (the others of the result are not set)
    and fills the keyframes' rows before the keyframe pass.
    noise: the step's DDPM noise map z_t [n, 4, h, w] (DDPM inversion): each frame takes the DDPM
    step with its own row; None: the DDIM step. `controlnet` (None: this step has none) gives every
    forward the residuals of its own frames."""
    watch = LoopWatch() if watch is None else watch
    n = latents.shape[0]
    own = watch.own_frames(n)
    if noise is not None and noise.shape != latents.shape:
        raise ValueError(f"denoise_step: noise map shape {tuple(noise.shape)} != latents shape {tuple(latents.shape)}")

    def step(frames: list[int], guided: Tensor) -> Tensor:
        """The sampler's step of `frames` from their guided output [F, 4, h, w]."""
        if noise is None:
            return ddim_step(schedule, guided, t, t_prev, latents[frames])
        return ddpm_step(schedule, guided, t, t_prev, latents[frames], noise[frames].to(latents))

    def forward(frames: list[int], control: EditControl) -> Tensor:
        residuals = None
        if controlnet is not None:
            watch.controlnet_forwarded(frames)
            residuals = controlnet.residuals(frames, latents[frames], t, prompts.negative, prompts.target)
        watch.forwarded(frames)
        return guided_output(unet, latents[frames], source[frames], t, prompts, control, settings.guidance_scale,
                             residuals=residuals)

    def denoise(frames: list[int], control: EditControl) -> Tensor:
        return step(frames, forward(frames, control))

    new = torch.empty_like(latents)
    if settings.mode in ("tokenflow", "fixed_keyframes"):
        watch.share_keyframes(latents, source, keyframes)
        # (I) keyframe pass: joint edit with extended attention; it records the tokens propagation uses
        released = settings.propagation == "released"
        tokens = KeyframeTokens(keyframes, record_source_outputs=released)
        control = watch.make_control(len(keyframes), pnp=pnp, joint_frames=len(keyframes), record=tokens, query_chunk=settings.query_chunk)
        keyframe_out = forward(keyframes, control)  # [K, 4, h, w] guided
        # (II) propagation pass over every frame. Under the paper's rule a keyframe is its own past
        # and future keyframe: its NN field onto itself is the identity, so Eq. 6 hands back its
        # own T_base at every layer and its propagation forward would repeat the keyframe pass
        # exactly. Its step is taken from the keyframe pass instead (n + K frame forwards per step
        # become n). Not so under the released rule, where a keyframe blends two groups' keyframes.
        # (Where a keyframe holds exactly equal tokens, e.g. a flat black border, the pass's argmax
        # would pick the first of them; reuse keeps each token's own, which is what Eq. 6 means.)
        if settings.reuse_keyframes and not released:
            own_set, keyframe_set = set(own), set(keyframes)
            mine = [(slot, k) for slot, k in enumerate(keyframes) if k in own_set]
            if mine:
                slots, frames = [s for s, _ in mine], [k for _, k in mine]
                new[frames] = step(frames, keyframe_out[slots])
            own = [i for i in own if i not in keyframe_set]
        neighbours = keyframe_neighbours(
            list(range(n)), keyframes, settings.weighting, rule=settings.propagation, interval=settings.keyframe_interval,
        ).to(latents.device)  # once per step, not per layer
        for frames in ([own[i] for i in b] for b in batches(len(own), settings.batch_size)):
            propagation = Propagation(tokens, neighbours.subset(frames), propagate_source=released)
            new[frames] = denoise(frames, watch.make_control(len(frames), pnp=pnp, propagation=propagation))
    elif settings.mode == "per_frame":
        for frames in ([own[i] for i in b] for b in batches(len(own), settings.batch_size)):
            new[frames] = denoise(frames, watch.make_control(len(frames), pnp=pnp))
    elif settings.mode == "extended_all":  # every frame attends to every frame (one process: n^2 memory)
        frames = list(range(n))
        new[:] = denoise(frames, watch.make_control(n, pnp=pnp, joint_frames=n, query_chunk=settings.query_chunk))
    else:
        raise ValueError(f"denoise_step: unknown mode {settings.mode!r} (one of {', '.join(EDIT_MODES)})")
    return new


@torch.no_grad()
def edit_video_latents(
    unet: UNet, schedule: Schedule, settings: EditSettings, prompts: PromptEmbeddings,
    source_latents: dict[int, Tensor], clean_latents: Tensor, timesteps: list[int], watch: LoopWatch | None = None, *,
    noise_maps: dict[int, Tensor] | None = None, controlnet: ControlNetGuide | None = None,
) -> tuple[Tensor, EditRecord]:
    """Alg. 1 on latents. source_latents: {t: [n, 4, h, w]} the inverted original video at every
    sampling timestep (DDPM inversion: its noisy versions x_t); clean_latents: [n, 4, h, w];
    timesteps: the whole sampling grid (edit_start drops the skipped steps). Returns the edited clean
    latents and a record. The latents between steps stay in float32 whatever the UNet's dtype
    (sampler.ddim.state_dtype). `watch` (LoopWatch) drives the steps' passes and sees each step
    end; under torchrun only its own rows of the result are computed.
    noise_maps: {t: z_t [n, 4, h, w]} DDPM inversion's maps, required when settings.inversion is
    ddpm (each step t -> t_prev is then the DDPM step with z_t), refused under ddim. With the
    inversion's prompt and guidance, per_frame mode and no injection that changes the outputs,
    the loop returns the inversion's every x_t and the clean latents (tests/test_ddpm_exactness.py).
    `controlnet` (controlnet_guide.ControlNetGuide) steers the edited branches on the steps of its
    window (fractions of the steps run here, after SDEdit's or the skip's start)."""
    watch = LoopWatch() if watch is None else watch
    n = clean_latents.shape[0]
    if controlnet is not None and controlnet.conditions.shape[0] != n:
        raise ValueError(f"edit: {controlnet.conditions.shape[0]} control images for {n} frames")
    n_steps = len(timesteps)
    latents, timesteps = edit_start(settings, schedule, timesteps, source_latents, clean_latents)
    skipped = n_steps - len(timesteps)
    require_inverted(source_latents, timesteps)
    require_noise_maps(settings, noise_maps, timesteps, tuple(clean_latents.shape))
    own = watch.own_frames(n)
    record = EditRecord()
    for step, t in enumerate(timesteps):
        t_prev = timesteps[step + 1] if step + 1 < len(timesteps) else -1
        keyframes = keyframes_at(settings, n, step)
        record.timesteps.append(int(t))
        if keyframes is not None:
            record.keyframes.append(keyframes)
        pnp = settings.injection(skipped + step, n_steps)  # PnP's fractions count in the whole grid
        source = source_latents[t].to(latents)
        noise = None if noise_maps is None else noise_maps[t].to(latents)
        guide = controlnet if controlnet is not None and controlnet.active(step, len(timesteps)) else None
        new = denoise_step(unet, schedule, settings, prompts, latents, source, t, t_prev, pnp, keyframes, watch,
                           noise=noise, controlnet=guide)
        if not torch.isfinite(new if len(own) == n else new[own]).all():
            raise FloatingPointError(f"edit: non-finite latents at step {step} (t={t}); try float32 or a lower guidance scale")
        latents = new
        watch.step_done(step, int(t), latents)
    return latents, record
