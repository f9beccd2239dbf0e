"""CLIP score of an edited video: the mean over frames of cos(CLIP image embedding of the frame,
CLIP text embedding of the target prompt). Raw cosine, not x100 and not clipped at 0, which is the
scale of the TokenFlow paper's Table 1 (0.33 for TokenFlow, 0.23 for the unedited reconstruction).

Default model: ViT-L/14, `openai/clip-vit-large-patch14` (a transformers CLIPModel). Weights come
from a local folder or the Hugging Face hub (only config, safetensors weights, preprocessing and
tokenizer files are fetched). Where neither is available the score is optional: `load_clip` raises
ClipUnavailable saying what to provide, `clip_score_or_none` and the CLI print
"CLIP score skipped: ..." and carry on (CLI exit code 0, so an evaluation script is not stopped by a
metric it cannot compute; bad input is exit code 2).

    python -m tools.clip_score --video edited.mp4 --prompt "a red wolf" [--clip-model PATH_OR_ID] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenflow.models.checkpoint import CheckpointError, env_flag
from tools.clip_model import LoadedClip, cosine_scores, load_clip_folder

DEFAULT_MODEL = "openai/clip-vit-large-patch14"
# Everything load_clip_folder reads; the hub repos also hold pickle/TF/Flax copies we never want.
HUB_FILES = ["config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "merges.txt",
             "tokenizer_config.json", "special_tokens_map.json"]


class ClipUnavailable(RuntimeError):
    """CLIP weights could be neither found locally nor downloaded; the message says what to provide."""


@dataclass
class ClipScoreResult:
    per_frame: list[float]  # cosine of each frame with the prompt
    mean: float


# ---------------------------------------------------------------------------------------------
# finding and loading the weights
# ---------------------------------------------------------------------------------------------

def _looks_like_hub_id(s: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", s) is not None


def _download(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read it now so a test or a script that sets
    # it later still gets the cache-only path (no ~25 s of network retries).
    offline = env_flag("HF_HUB_OFFLINE")
    try:
        try:  # the cache first: no network needed when the files are already there
            return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
        except Exception:
            if offline:
                raise
            return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown id, no network: the same advice for all
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        raise ClipUnavailable(
            f"CLIP weights '{repo_id}' are not available ({'HF_HUB_OFFLINE is set' if offline else 'hub not reachable'}; {why}; "
            f"cache {constants.HF_HUB_CACHE}). Provide a local folder path of a transformers CLIPModel with "
            "safetensors weights (config.json + model.safetensors, optionally preprocessor_config.json, "
            f"vocab.json, merges.txt), e.g. made with `hf download {repo_id} {' '.join(HUB_FILES)} "
            "--local-dir clip` where the hub is reachable, or give this machine network access to the hub id."
        ) from None


def load_clip(model: str | os.PathLike = DEFAULT_MODEL, *, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> LoadedClip:
    """A local CLIPModel folder, or a hub id (downloaded or from the cache). Raises ClipUnavailable when
    a hub id cannot be had, FileNotFoundError for a local path that does not exist."""
    path = Path(os.path.expanduser(str(model)))
    if path.is_dir():
        return load_clip_folder(path, device=device, dtype=dtype)
    if path.exists():
        raise FileNotFoundError(f"{path}: is a file; expected a folder of a transformers CLIPModel (config.json + model.safetensors)")
    if not _looks_like_hub_id(str(model)):
        raise FileNotFoundError(f"{model}: no such folder (expected a transformers CLIPModel folder or a hub id like {DEFAULT_MODEL})")
    return load_clip_folder(_download(str(model)), device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# the score
# ---------------------------------------------------------------------------------------------

def _as_frames(frames) -> torch.Tensor:
    """A video path, or uint8 [F, H, W, 3] (numpy or torch) -> torch uint8 [F, H, W, 3]."""
    if isinstance(frames, (str, os.PathLike)):
        from tokenflow.media import read_video

        return read_video(frames).frames
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"clip_score: frames must be a video path or a uint8 array [F, H, W, 3], got {type(frames).__name__}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"clip_score: frames must be uint8 (0..255), got dtype {frames.dtype}")
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"clip_score: frames must have shape [F, H, W, 3] with F >= 1 (RGB), got {tuple(frames.shape)}")
    return frames


def clip_score(frames, prompt: str, *, model: str | os.PathLike | LoadedClip = DEFAULT_MODEL,
               device: str | torch.device = "cpu", batch_size: int = 16) -> ClipScoreResult:
    """Mean over frames of cos(image embedding, text embedding of `prompt`).

    `frames`: uint8 [F, H, W, 3] RGB (numpy or torch) or a video path / image folder.
    `model`: a local CLIPModel folder, a hub id, or an already loaded `LoadedClip` (to score many videos).
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"clip_score: prompt must be a non-empty string, got {prompt!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"clip_score: batch_size must be a positive int, got {batch_size!r}")
    video = _as_frames(frames)
    clip = model if isinstance(model, LoadedClip) else load_clip(model, device=device)
    per_frame = cosine_scores(clip.embed_images(video, batch_size=batch_size), clip.embed_text(prompt))
    return ClipScoreResult(per_frame=per_frame, mean=float(np.mean(per_frame)))


def clip_score_or_none(frames, prompt: str, **kwargs) -> ClipScoreResult | None:
    """clip_score, or None with a printed "CLIP score skipped: ..." when the weights are unavailable.
    Other errors (bad frames, a missing local folder, a broken checkpoint) still raise."""
    try:
        return clip_score(frames, prompt, **kwargs)
    except ClipUnavailable as e:
        print(f"CLIP score skipped: {e}")
        return None


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.clip_score",
        description="CLIP score of a video against a prompt: the mean over frames of the cosine between the "
                    "CLIP image embedding of each frame and the CLIP text embedding of the prompt (the TokenFlow "
                    "paper's Table 1 scale). Prints one line per frame, then the mean on the last line. "
                    "Exit code 0 also when the CLIP weights are unavailable (a 'CLIP score skipped: ...' line "
                    "says what to provide); 2 on bad input.",
        allow_abbrev=False,
    )
    parser.add_argument("--video", required=True, help="edited video (file, or folder of png/jpg frames)")
    parser.add_argument("--prompt", required=True, help="the target prompt of the edit")
    parser.add_argument("--clip-model", default=DEFAULT_MODEL,
                        help=f"local transformers CLIPModel folder (safetensors) or hub id (default {DEFAULT_MODEL})")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--batch-size", type=int, default=16, help="frames per forward pass (default 16)")
    args = parser.parse_args(argv)

    try:
        result = clip_score(args.video, args.prompt, model=args.clip_model, device=args.device, batch_size=args.batch_size)
    except ClipUnavailable as e:
        print(f"CLIP score skipped: {e}")
        return 0
    except (ValueError, TypeError, RuntimeError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, s in enumerate(result.per_frame):
        print(f"frame {i:4d} clip score {s:.4f}")
    print(f"mean clip score: {result.mean:.4f} ({len(result.per_frame)} frames, {args.clip_model})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
