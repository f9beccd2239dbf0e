"""Capturing self-attention tokens for the paper's figures, with explicit controls (no hooks).

Two recorders:
- `TokenRecorder` (a plain `UNetControl`): runs every self-attention as usual and keeps the input
  and output tokens of ONE layer. For the original video's features (Fig. 3: the NN field).
- `RecordingEditControl` (an `EditControl`): behaves exactly as the edit's control and keeps the
  output tokens of one layer for the source branch and the conditional branch (Fig. 2).

How Fig. 2 gets the edited features at step s without touching tokenflow/edit.py (which builds its
controls inside the loop, with no seam for a recording one): `edit_video_latents` takes a `progress`
wrapper around its step iterator; `stop_before(s)` ends that iterator at step s, so the loop returns
the edited latents J_{t_s} exactly as a full run has them at step s (same timesteps, same PnP
injection schedule, same keyframe draws for steps < s). Step s itself is then replayed by hand with
`guided_output` and the same controls edit.py builds (keyframe pass + propagation pass for
TokenFlow, one pass for per-frame), with a recording control in the pass whose tokens we keep.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from tokenflow.controls import EditControl, KeyframeTokens, Propagation
from tokenflow.edit import EditSettings, PromptEmbeddings, edit_start, edit_video_latents, guided_output
from tokenflow.keyframes import fixed_keyframes, random_keyframes
from tokenflow.propagation import Neighbours, keyframe_neighbours
from unet.control import UNetControl

HIGHEST_RES_DECODER_LAYER = "up_blocks.3.attentions.2.transformer_blocks.0.attn1"


class TokenRecorder(UNetControl):
    """Plain Stable Diffusion, keeping the self-attention input/output tokens [B, N, C] of `layer`."""

    def __init__(self, layer: str):
        self.layer = layer
        self.inputs: Tensor | None = None
        self.outputs: Tensor | None = None

    def self_attention(self, attn, x: Tensor) -> Tensor:
        out = attn.plain(x)
        if attn.path == self.layer:
            self.inputs, self.outputs = x.detach().float().cpu(), out.detach().float().cpu()
        return out


class RecordingEditControl(EditControl):
    """EditControl that also keeps the output tokens of `layer`: `source` [F, N, C] (original video
    branch) and `conditional` [F, N, C] (the edit as the target prompt sees it)."""

    def __init__(self, frames: int, layer: str, **kwargs):
        super().__init__(frames, **kwargs)
        self.layer = layer
        self.source: Tensor | None = None
        self.conditional: Tensor | None = None

    def self_attention(self, attn, x: Tensor) -> Tensor:
        out = super().self_attention(attn, x)  # [3F, N, C]: source | unconditional | conditional
        if attn.path == self.layer:
            f = self.frames
            self.source = out[:f].detach().float().cpu()
            self.conditional = out[2 * f :].detach().float().cpu()
        return out


def check_layer(unet, layer: str) -> None:
    paths = [m.path for m in unet.modules() if type(m).__name__ == "SelfAttention"]
    if layer not in paths:
        raise ValueError(f"layer {layer!r} is not a self-attention of this UNet; choose one of: {', '.join(paths)}")


def token_grid(n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (rows, cols) of a layer's token map: the latent grid downsampled by a power of two."""
    h, w = latent_hw
    factor = 1
    while (h // factor) * (w // factor) > n_tokens and factor <= max(h, w):
        factor *= 2
    gh, gw = -(-h // factor), -(-w // factor)  # ceil: the UNet's downsampling pads odd sizes
    if gh * gw != n_tokens:
        raise ValueError(f"{n_tokens} tokens are not a power-of-two downsampling of the {h}x{w} latent grid")
    return gh, gw


# ------------------------------------------------------------------------------------ the source


@dataclass
class SourceVideo:
    """The original video prepared as run_edit prepares it: frames, models, latents, inversion."""

    cfg: dict
    frames: Tensor  # uint8 [n, H, W, 3] as the pipeline read and resized them
    indices: list[int]  # position of each kept frame in the pipeline's selection
    models: object  # tokenflow.loading.Models
    clean: Tensor  # [n, 4, h, w]
    prompts: PromptEmbeddings
    timesteps: list[int]  # the sampling grid (cfg.steps)
    source_latents: dict[int, Tensor]  # t -> [n, 4, h, w], device and dtype of the models


def prepare_source(cfg: dict, work_dir: Path | str, *, prompt: str | None = None, frames: list[int] | None = None) -> SourceVideo:
    """Read, encode and DDIM-invert the video of `cfg` (cached as the pipeline caches it), and embed
    the prompts. `frames`: only these positions of the selection (e.g. the two frames of Fig. 3)."""
    from tokenflow.inversion import encode_frames, invert_frames
    from tokenflow.inversion_cache import InversionCache, video_digest
    from tokenflow.pipeline import check_prompt, load_model_bundle, load_video, pick_device, pick_dtype
    from tokenflow.video import to_model_range

    work_dir = Path(work_dir)
    video = load_video(cfg, work_dir)
    for note in video.notes:
        print(f"[figures] {note}", file=sys.stderr)
    positions = list(range(video.num_frames)) if frames is None else list(frames)
    bad = [i for i in positions if not 0 <= i < video.num_frames]
    if bad:
        raise ValueError(f"frames {bad} are outside the clip's {video.num_frames} selected frames (0..{video.num_frames - 1})")
    device = pick_device(cfg["device"])
    dtype = pick_dtype(cfg["dtype"], device)
    models = load_model_bundle(cfg, device, dtype)
    chosen = video.frames[positions]
    clean = encode_frames(models.vae, to_model_range(chosen), cfg["inversion"]["batch_size"])
    target = check_prompt(cfg["prompt"] if prompt is None else prompt, "prompt")
    ids = models.tokenizer([cfg["inversion_prompt"], cfg["negative_prompt"], target])
    with torch.no_grad():
        emb = models.text_encoder(ids.to(device))
    prompts = PromptEmbeddings(source=emb[0:1], negative=emb[1:2], target=emb[2:3])
    schedule = models.config.schedule
    timesteps = schedule.timesteps(cfg["steps"]).tolist()
    inv = cfg["inversion"]
    cache = None
    if inv["cache"]:
        # the same key fields as the pipeline: a full-clip figure reuses the edit's inversion
        cache = InversionCache.for_run(
            inv["cache_dir"], video_digest=video_digest(video.path), indices=[video.indices[i] for i in positions],
            size=[video.height, video.width], model_id=str(cfg["model"]["source"]), inversion_steps=inv["steps"],
            keep_timesteps=timesteps, prompt=cfg["inversion_prompt"],
            extra={"dtype": str(dtype).replace("torch.", ""),
                   "seed": cfg["model"].get("seed", 0) if cfg["model"]["source"] == "tiny" else None},
        )
        if inv["force"]:
            cache.clear()
    source_latents = invert_frames(
        models.unet, schedule, clean, prompts.source, inversion_steps=inv["steps"], keep_timesteps=timesteps,
        batch_size=inv["batch_size"], cache=cache,
    )
    return SourceVideo(
        cfg=cfg, frames=chosen, indices=positions, models=models, clean=clean, prompts=prompts, timesteps=timesteps,
        source_latents={t: x.to(device, dtype) for t, x in source_latents.items()},
    )


def default_step(n_steps: int) -> int:
    """A fifth of the way into sampling (step 10 of 50): structure is set, detail still forming."""
    return n_steps // 5


def check_step(step: int, n_steps: int) -> None:
    if not 0 <= step < n_steps:
        raise ValueError(f"step {step} is outside the {n_steps} denoising steps of this run (0..{n_steps - 1})")


# ----------------------------------------------------------------------- features at one step


def original_tokens(src: SourceVideo, positions: list[int], step: int, layer: str) -> tuple[Tensor, Tensor]:
    """Self-attention (inputs, outputs) [F, N, C] of the ORIGINAL video at sampling step `step`:
    the inverted latents x_t fed with the inversion prompt, as the edit's source branch sees them."""
    check_step(step, len(src.timesteps))
    check_layer(src.models.unet, layer)
    t = src.timesteps[step]
    x = src.source_latents[t][positions]
    recorder = TokenRecorder(layer)
    with torch.no_grad():
        src.models.unet(x, t, src.prompts.source.expand(len(positions), -1, -1).to(x.dtype), recorder)
    return recorder.inputs, recorder.outputs


def stop_before(step: int):
    """A `progress` wrapper for edit_video_latents that ends its step loop before `step`."""

    def progress(steps):
        for s in steps:
            if s >= step:
                return
            yield s

    return progress


def step_keyframes(settings: EditSettings, n: int, step: int) -> list[int]:
    """The keyframes edit.py uses at `step`: its generator (seeded with settings.seed) draws once per
    step, so the step's draw is the (step+1)-th."""
    if settings.mode == "fixed_keyframes":
        return fixed_keyframes(n, settings.keyframe_interval)
    generator = torch.Generator().manual_seed(settings.seed)
    for _ in range(step + 1):
        keyframes = random_keyframes(n, settings.keyframe_interval, generator)
    return keyframes


@dataclass
class StepTokens:
    source: Tensor  # [F, N, C] self-attention outputs of the original video's branch
    edited: Tensor  # [F, N, C] of the conditional (target prompt) branch
    timestep: int
    keyframes: list[int] | None  # the step's keyframes (TokenFlow modes)
    guided: Tensor  # [F, 4, h, w] the step's guided model output for these frames (what the DDIM step uses)


@torch.no_grad()
def edited_tokens(src: SourceVideo, settings: EditSettings, positions: list[int], step: int, layer: str) -> StepTokens:
    """Self-attention outputs of `layer` at sampling step `step` of an edit in settings.mode
    ("per_frame", "tokenflow" or "fixed_keyframes"), for the frames at `positions`."""
    unet, schedule = src.models.unet, src.models.config.schedule
    check_layer(unet, layer)
    if settings.mode not in ("per_frame", "tokenflow", "fixed_keyframes"):
        raise ValueError(f"feature capture supports the per_frame, tokenflow and fixed_keyframes modes, not {settings.mode!r}")
    n = src.clean.shape[0]
    _, run_timesteps = edit_start(settings, schedule, src.timesteps, src.source_latents, src.clean)
    check_step(step, len(run_timesteps))

    if settings.mode == "per_frame":
        # frames are edited independently: running only the chosen ones gives their exact latents
        frames = list(positions)
        latents, _ = edit_video_latents(
            unet, schedule, settings, src.prompts, {t: x[frames] for t, x in src.source_latents.items()},
            src.clean[frames], src.timesteps, progress=stop_before(step),
        )
        local = list(range(len(frames)))
    else:  # propagation needs every frame's latents (the keyframes can be any of them)
        latents, record = edit_video_latents(
            unet, schedule, settings, src.prompts, src.source_latents, src.clean, src.timesteps, progress=stop_before(step),
        )
        local = list(positions)
        drawn = [step_keyframes(settings, n, s) for s in range(step)]
        if drawn != record.keyframes:  # edit.py changed how it draws keyframes: fail loudly, not silently off
            raise RuntimeError(f"keyframe replay mismatch: edit drew {record.keyframes}, replay drew {drawn}")

    t = run_timesteps[step]
    source = src.source_latents[t]
    pnp = settings.injection(step, len(run_timesteps))
    scale = settings.guidance_scale
    if settings.mode == "per_frame":
        control = RecordingEditControl(len(positions), layer, pnp=pnp)
        guided = guided_output(unet, latents[local], source[positions], t, src.prompts, control, scale)
        return StepTokens(control.source, control.conditional, int(t), None, guided)

    keyframes = step_keyframes(settings, n, step)
    # (I) keyframe pass, as edit.py: joint edit of the keyframes, recording T_base
    tokens = KeyframeTokens(keyframes)
    kf_control = EditControl(len(keyframes), pnp=pnp, joint_frames=len(keyframes), record=tokens, query_chunk=settings.query_chunk)
    guided_output(unet, latents[keyframes], source[keyframes], t, src.prompts, kf_control, scale)
    # (II) propagation pass of the chosen frames (each frame's output depends only on itself and T_base)
    every = keyframe_neighbours(list(range(n)), keyframes, settings.weighting)
    neighbours = Neighbours(past=every.past[local], future=every.future[local], w=every.w[local])
    control = RecordingEditControl(len(local), layer, pnp=pnp, propagation=Propagation(tokens, neighbours))
    guided = guided_output(unet, latents[local], source[local], t, src.prompts, control, scale)
    return StepTokens(control.source, control.conditional, int(t), keyframes, guided)
