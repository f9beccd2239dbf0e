"""Capturing self-attention tokens for the paper's figures, with explicit controls (no hooks).

- `TokenRecorder` (tokenflow.figures.tokens, a plain `UNetControl`): runs every self-attention as
  usual and keeps the input and output tokens of ONE layer. For the original video's features
  (Fig. 3: the NN field).
- `StepRecorder`: a `tokenflow.edit.LoopWatch` whose controls at one denoising step are the edit's
  own `EditControl`s that also keep one layer's output tokens of the source and the conditional
  branch (Fig. 2); it ends the edit after that step.

Edited features at step s: `edit_video_latents` runs the edit itself, watched by a StepRecorder, with
keyframe reuse off (`reuse_keyframes=False`, a setting of the loop) so that every frame's tokens,
keyframes included, come from the propagation pass; the keyframes of step s come from
`keyframes_at`, the same pure function of (seed, step) the edit uses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from tokenflow.config import RunConfig
from tokenflow.controls import EditControl
from tokenflow.edit import EditSettings, LoopWatch, edit_start, edit_video_latents, keyframes_at
from tokenflow.figures.tokens import (  # noqa: F401 (the figure tools import them from here)
    HIGHEST_RES_DECODER_LAYER, TokenRecorder, check_layer, check_step, default_step, original_tokens, token_grid,
)
from tokenflow.source import SourceVideo
from tokenflow.source import prepare_source as _prepare_source


class StepRecorded(Exception):
    """Raised by StepRecorder after its step: the edit has nothing more to give the figure."""


class StepRecorder(LoopWatch):
    """Watches an edit: during step `step` its controls keep `layer`'s output tokens of the source
    branch and of the conditional branch, batch after batch, for the passes that produce frames'
    outputs (the propagation or per-frame passes; not the keyframe pass, which only records T_base);
    after that step it keeps the latents and ends the edit (StepRecorded)."""

    def __init__(self, step: int, layer: str):
        super().__init__()
        self.step, self.layer = step, layer
        self.current = 0  # the step the loop is in: one past the last finished
        self.source: list[Tensor] = []  # [F_batch, N, C] per batch, in frame order
        self.conditional: list[Tensor] = []
        self.next_latents: Tensor | None = None  # [n, 4, h, w] after the step

    def make_control(self, frames: int, **kwargs) -> EditControl:
        if self.current != self.step:
            return super().make_control(frames, **kwargs)
        return _RecordingEditControl(frames, self, **kwargs)

    def step_done(self, step: int, t: int, latents: Tensor) -> None:
        self.current = step + 1
        if step == self.step:
            self.next_latents = latents
            raise StepRecorded


class _RecordingEditControl(EditControl):
    def __init__(self, frames: int, recorder: StepRecorder, **kwargs):
        super().__init__(frames, **kwargs)
        self.recorder = recorder

    def self_attention(self, attn, x: Tensor) -> Tensor:
        out = super().self_attention(attn, x)  # [3F, N, C]: source | unconditional | conditional
        if attn.path == self.recorder.layer and self.record is None:
            f = self.frames
            self.recorder.source.append(out[:f].detach().float().cpu())
            self.recorder.conditional.append(out[2 * f :].detach().float().cpu())
        return out


# ------------------------------------------------------------------------------------ the source


def prepare_source(cfg: RunConfig, *, frames: list[int] | None = None) -> SourceVideo:
    """The video of `cfg` read, encoded, inverted (cached) and its prompts embedded, exactly as the
    pipeline does (tokenflow.source); `frames`: only these positions of the selection (e.g. the two
    frames of Fig. 3)."""
    return _prepare_source(cfg, positions=frames)


# ----------------------------------------------------------------------- features at one step


@dataclass
class StepTokens:
    source: Tensor  # [F, N, C] self-attention outputs of the original video's branch
    edited: Tensor  # [F, N, C] of the conditional (target prompt) branch
    timestep: int
    keyframes: list[int] | None  # the step's keyframes (TokenFlow modes)
    next_latents: Tensor  # [F, 4, h, w] these frames' latents after the step (what the edit continues from)


@torch.no_grad()
def edited_tokens(src: SourceVideo, settings: EditSettings, positions: list[int], step: int, layer: str) -> StepTokens:
    """Self-attention outputs of `layer` at sampling step `step` of an edit in settings.mode
    ("per_frame", "tokenflow" or "fixed_keyframes"), for the frames at `positions`."""
    unet, schedule = src.models.unet, src.models.config.schedule
    check_layer(unet, layer)
    if settings.mode not in ("per_frame", "tokenflow", "fixed_keyframes"):
        raise ValueError(f"feature capture supports the per_frame, tokenflow and fixed_keyframes modes, not {settings.mode!r}")
    # every frame's tokens come from the propagation pass, keyframes included: the pass that keyframe
    # reuse skips for them (the same latents either way, to float rounding)
    settings = replace(settings, reuse_keyframes=False)
    _, run_timesteps = edit_start(settings, schedule, src.timesteps, src.source_latents, src.clean)
    check_step(step, len(run_timesteps))
    # per-frame edits are independent: the chosen frames alone give their exact latents; propagation
    # needs every frame (the keyframes can be any of them)
    frames = list(positions) if settings.mode == "per_frame" else list(range(src.clean.shape[0]))
    local = list(range(len(frames))) if settings.mode == "per_frame" else list(positions)
    source_latents = {t: x[frames] for t, x in src.source_latents.items()}
    recorder = StepRecorder(step, layer)
    try:
        edit_video_latents(unet, schedule, settings, src.prompts, source_latents, src.clean[frames], src.timesteps, recorder)
    except StepRecorded:
        pass
    source, edited = torch.cat(recorder.source), torch.cat(recorder.conditional)
    keyframes = keyframes_at(settings, len(frames), step)
    return StepTokens(source[local], edited[local], int(run_timesteps[step]), keyframes, recorder.next_latents[local])
