"""The TokenFlow sampling loop (paper Alg. 1), on latents. I/O-free: see pipeline.py for video in/out.

At each denoising step t (Alg. 1):
  1. sample keyframe indices (keyframes.py);
  2. keyframe pass: the keyframes alone, edited jointly with extended attention (Eq. 3-4), recording
     T_base and the original video's self-attention inputs at every self-attention layer;
  3. propagation pass: all frames in batches; each self-attention layer of the edited branches
     outputs Eq. 6 of the recorded tokens through the NN field (Eq. 5) of the original features;
  4. DDIM step of every frame with classifier-free guidance.
The editing technique (PnP-Diffusion or SDEdit) acts through the same passes (controls.py).

Modes (the paper's ablations, `tokenflow.mode=`): `tokenflow` (default), `fixed_keyframes` (same
evenly spaced keyframes every step), `per_frame` (the editing technique on each frame alone) and
`extended_all` ("w/o TokenFlow": extended attention across all frames, no propagation).
Propagation rules (`tokenflow.propagation=`): `paper` (Eq. 6-7 as printed) or `released` (the
authors' released code: group-centre weights, source branch propagated too); see propagation.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor

from sampler.ddim import classifier_free_guidance, ddim_step, sdedit_start, state_dtype
from sampler.schedule import Schedule
from unet.model import UNet

from .controls import EditControl, KeyframeTokens, PnPInjection, Propagation
from .keyframes import fixed_keyframes, random_keyframes
from .propagation import RULES, keyframe_neighbours

MODES = ("tokenflow", "fixed_keyframes", "per_frame", "extended_all")
METHODS = ("pnp", "sdedit")

# PnP-Diffusion's injection layers for SD-2.1 (sd21.md): decoder self-attention q/k, one resnet.
PNP_QK_LAYERS = (
    "up_blocks.1.attentions.1", "up_blocks.1.attentions.2",
    "up_blocks.2.attentions.0", "up_blocks.2.attentions.1", "up_blocks.2.attentions.2",
    "up_blocks.3.attentions.0", "up_blocks.3.attentions.1", "up_blocks.3.attentions.2",
)
PNP_FEATURE_LAYERS = ("up_blocks.1.resnets.1",)


@dataclass
class EditSettings:
    mode: str = "tokenflow"
    method: str = "pnp"
    guidance_scale: float = 7.5
    keyframe_interval: int = 8
    weighting: str = "sigmoid"  # Eq. 7 as printed; "linear": w = d- / (d+ + d-)
    propagation: str = "paper"  # which keyframes a frame blends: "paper" (Eq. 6-7) or "released" (authors' code)
    reuse_keyframes: bool = True  # paper rule: a keyframe's step comes from the keyframe pass (see denoise_step)
    batch_size: int = 8  # frames per forward in the propagation / per-frame passes
    seed: int = 0
    pnp_qk_fraction: float = 0.5  # q/k injection for the first 50% of steps
    pnp_feature_fraction: float = 0.8  # residual feature injection for the first 80%
    pnp_qk_layers: tuple[str, ...] = PNP_QK_LAYERS
    pnp_feature_layers: tuple[str, ...] = PNP_FEATURE_LAYERS
    sdedit_strength: float = 0.6
    query_chunk: int | None = None  # bound the extended attention's score matrix (None: SDPA decides)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"tokenflow.mode must be one of {MODES}, got {self.mode!r}")
        if self.propagation not in RULES:
            raise ValueError(f"tokenflow.propagation must be one of {RULES}, got {self.propagation!r}")
        if self.propagation == "released" and self.mode == "fixed_keyframes":
            raise ValueError("tokenflow.propagation=released pairs each interval with its own drawn keyframe; "
                             "fixed_keyframes spaces them evenly instead: use tokenflow.propagation=paper with it")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.batch_size < 1 or self.keyframe_interval < 1:
            raise ValueError(f"batch_size and keyframe_interval must be >= 1, got {self.batch_size}, {self.keyframe_interval}")
        for name in ("pnp_qk_fraction", "pnp_feature_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        # checked here, not only where sampling starts: a bad strength should fail before the
        # models load and the video is inverted, not after
        if not 0.0 < self.sdedit_strength <= 1.0:
            raise ValueError(f"sdedit strength (method.strength) must be in (0, 1], got {self.sdedit_strength}")
        self.pnp_qk_layers, self.pnp_feature_layers = tuple(self.pnp_qk_layers), tuple(self.pnp_feature_layers)

    def injection(self, step: int, n_steps: int) -> PnPInjection:
        """PnP injects for the first fraction of the steps; SDEdit never."""
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
    keyframes: list[list[int]] = field(default_factory=list)  # per step
    timesteps: list[int] = field(default_factory=list)
    unet_frame_forwards: int = 0  # frames through the UNet (each with its 3 branches), all steps


def require_inverted(source_latents: dict[int, Tensor], timesteps: list[int]) -> None:
    """Every sampling timestep needs the original video's inverted latents (the source branch)."""
    missing = [t for t in timesteps if t not in source_latents]
    if missing:
        raise ValueError(f"edit: no inverted latents for timesteps {missing[:5]} (invert with these sampling timesteps kept)")


def edit_start(
    settings: EditSettings, schedule: Schedule, timesteps: list[int], source_latents: dict[int, Tensor],
    clean_latents: Tensor,
) -> tuple[Tensor, list[int]]:
    """Where sampling starts. PnP: the inverted latents x_T of the original video (all steps).
    SDEdit: the clean latents noised to the strength's timestep, one noise map shared by every
    frame (seeded), so the frames start alike; the remaining steps follow."""
    dtype = state_dtype(clean_latents.dtype)  # the DDIM state is float32 whatever the model's dtype
    if settings.method == "pnp":
        require_inverted(source_latents, timesteps)  # before the lookup: a clear error, not a KeyError
        return source_latents[timesteps[0]].to(clean_latents.device, dtype, copy=True), list(timesteps)
    clean = clean_latents.to(dtype)
    g = torch.Generator().manual_seed(settings.seed + 1)
    noise = torch.randn((1, *clean.shape[1:]), generator=g).to(clean)
    x_t, remaining = sdedit_start(schedule, clean, noise.expand_as(clean), settings.sdedit_strength, timesteps)
    return x_t, remaining.tolist()


def guided_output(
    unet: UNet, edited: Tensor, source: Tensor, t: int, prompts: PromptEmbeddings, control: EditControl, scale: float,
) -> Tensor:
    """One UNet forward over [source | unconditional | conditional] x F frames -> guided output [F, ...]."""
    f = edited.shape[0]
    x = torch.cat([source, edited, edited]).to(unet.conv_in.weight.dtype)  # [3F, 4, h, w]; float32 state -> model dtype
    context = torch.cat([prompts.source.expand(f, -1, -1), prompts.negative.expand(f, -1, -1), prompts.target.expand(f, -1, -1)])
    _, uncond, cond = unet(x, t, context.to(x.dtype), control).chunk(3)
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


# The controls of a step are built through this callable (EditControl itself by default); a tool
# that records tokens passes a subclass, explicitly, instead of hooking the UNet.
ControlFactory = Callable[..., EditControl]


def denoise_step(
    unet: UNet, schedule: Schedule, settings: EditSettings, prompts: PromptEmbeddings, latents: Tensor, source: Tensor,
    t: int, t_prev: int, pnp: PnPInjection, keyframes: list[int] | None, make_control: ControlFactory = EditControl,
    own_frames: list[int] | None = None, record: EditRecord | None = None,
) -> Tensor:
    """One step of Alg. 1 for every frame of `latents` [n, 4, h, w] (source: the original video's
    x_t, same shape) -> the latents at t_prev. `own_frames`: compute only these frames in the
    propagation / per-frame pass (one rank's share under torchrun; the other rows of the result are
    not set); the keyframe pass still takes the keyframes' rows, which must hold their values.
    `record`: counts the frames sent through the UNet."""
    n = latents.shape[0]
    own = list(range(n)) if own_frames is None else list(own_frames)

    def forward(frames: list[int], control: EditControl) -> Tensor:
        if record is not None:
            record.unet_frame_forwards += len(frames)
        return guided_output(unet, latents[frames], source[frames], t, prompts, control, settings.guidance_scale)

    def denoise(frames: list[int], control: EditControl) -> Tensor:
        return ddim_step(schedule, forward(frames, control), t, t_prev, latents[frames])

    new = torch.empty_like(latents)
    if settings.mode in ("tokenflow", "fixed_keyframes"):
        # (I) keyframe pass: joint edit with extended attention; it records the tokens propagation uses
        released = settings.propagation == "released"
        tokens = KeyframeTokens(keyframes, record_source_outputs=released)
        control = make_control(len(keyframes), pnp=pnp, joint_frames=len(keyframes), record=tokens, query_chunk=settings.query_chunk)
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
                new[frames] = ddim_step(schedule, keyframe_out[slots], t, t_prev, latents[frames])
            own = [i for i in own if i not in keyframe_set]
        neighbours = keyframe_neighbours(
            list(range(n)), keyframes, settings.weighting, rule=settings.propagation, interval=settings.keyframe_interval,
        ).to(latents.device)  # once per step, not per layer
        for frames in ([own[i] for i in b] for b in batches(len(own), settings.batch_size)):
            propagation = Propagation(tokens, neighbours.subset(frames), propagate_source=released)
            new[frames] = denoise(frames, make_control(len(frames), pnp=pnp, propagation=propagation))
    elif settings.mode == "per_frame":
        for frames in ([own[i] for i in b] for b in batches(len(own), settings.batch_size)):
            new[frames] = denoise(frames, make_control(len(frames), pnp=pnp))
    else:  # extended_all: every frame attends to every frame; memory grows with n^2 on CPU
        frames = list(range(n))
        new[:] = denoise(frames, make_control(n, pnp=pnp, joint_frames=n, query_chunk=settings.query_chunk))
    return new


@torch.no_grad()
def edit_video_latents(
    unet: UNet, schedule: Schedule, settings: EditSettings, prompts: PromptEmbeddings,
    source_latents: dict[int, Tensor], clean_latents: Tensor, timesteps: list[int],
    progress: Callable[[Iterable], Iterable] | None = None, shard=None,
) -> tuple[Tensor, EditRecord]:
    """Alg. 1 on latents. source_latents: {t: [n, 4, h, w]} the inverted original video at every
    sampling timestep; clean_latents: [n, 4, h, w]. Returns the edited clean latents and a record.
    The latents between steps stay in float32 whatever the UNet's dtype (sampler.ddim.state_dtype).
    `progress` wraps the step iterator (a bar; it may also stop the loop early). `shard`
    (distributed.FrameShard, torchrun): compute only its frames' rows; it fills each step's keyframe
    rows from the ranks that own them."""
    n = clean_latents.shape[0]
    latents, timesteps = edit_start(settings, schedule, timesteps, source_latents, clean_latents)
    require_inverted(source_latents, timesteps)
    record = EditRecord()
    steps = range(len(timesteps)) if progress is None else progress(range(len(timesteps)))
    for step in steps:
        t = timesteps[step]
        t_prev = timesteps[step + 1] if step + 1 < len(timesteps) else -1
        keyframes = keyframes_at(settings, n, step)
        record.timesteps.append(int(t))
        if keyframes is not None:
            record.keyframes.append(keyframes)
        pnp = settings.injection(step, len(timesteps))
        source = source_latents[t].to(latents)
        if shard is not None and keyframes is not None:
            shard.share_keyframes(latents, source, keyframes)
        own = None if shard is None else shard.frames
        new = denoise_step(unet, schedule, settings, prompts, latents, source, t, t_prev, pnp, keyframes, own_frames=own, record=record)
        if not torch.isfinite(new if own is None else new[own]).all():
            raise FloatingPointError(f"edit: non-finite latents at step {step} (t={t}); try float32 or a lower guidance scale")
        latents = new
    return latents, record
