"""On-disk cache of inverted latents (DDIM, or DDPM's noisy versions and noise maps), one safetensors file per frame.

Inversion is the slow, edit-independent half of TokenFlow: every prompt edit of the same clip
reuses it. So the latents of each frame at the kept timesteps are stored under a key that hashes
everything they depend on (clip bytes, selected frames, size, model, steps, kept timesteps,
inversion prompt; for a model on local disk also the size and modification time of its weight and
config files, since a path says where weights are, not which). A DDPM inversion's key also holds a
`ddpm` entry (noise seed, shared noise, source guidance; the negative prompt when that guidance is
not 1), which a DDIM key never has: neither is ever read as the other. A frame is written atomically (temp
file + rename) the moment it is done, so a run that crashes leaves only whole files and the rerun
recomputes just the missing frames. A file that is nevertheless unreadable (truncated by a full
disk, copied half-way) counts as missing, with a warning, rather than stopping the run.

Several runs may invert the same clip into one cache at once (a sweep's jobs, the ranks of one
distributed run). Before computing a frame a run claims it: it creates frame_00000.claim with
O_CREAT|O_EXCL, which exactly one process can do, so each frame is computed once; the others wait
for its file (it appears whole, by rename) and load it. A claim whose owner died (same host: its pid
is gone; another host: the claim was not refreshed for CLAIM_STALE_S seconds) is taken over, so a
frame is computed at worst twice, never left waiting.

Layout:  <root>/<key>/meta.json                  the key fields, as JSON
         <root>/<key>/frame_00000.safetensors    {"t981": [4, h, w], "t961": ..., ...} + metadata
                                                  DDPM: also the noise maps {"z981": [4, h, w], ...}
         <root>/sample_clip/                     the generated sample clip (pipeline, video=sample)
Root:    $TOKENFLOW_CACHE, else ~/.cache/tokenflow/inversions
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path

import torch

from .models.checkpoint import safetensors_header
from .media import image_files

KEY_LENGTH = 16  # hex chars of sha256: 64 bits, plenty for one user's cache
CLAIM_STALE_S = 3600.0  # a claim from another host not refreshed for this long: its owner is gone
CLAIM_POLL_S = 0.5  # how often a run waiting for another's frames looks again
CHUNK = 1 << 20


class CacheError(ValueError):
    """An inversion cache that cannot be used as asked; the message names the file."""


def default_cache_root() -> Path:
    env = os.environ.get("TOKENFLOW_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tokenflow" / "inversions"


def video_digest(path: Path | str) -> str:
    """sha256 hex of a video file's bytes, or of a folder's frames (each file's name and bytes).

    For a folder the files are the ones `read_video` reads (png/jpg in name order), so renaming,
    adding or editing a frame changes the digest, while an unrelated README does not.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such video file or image folder")
    h = hashlib.sha256()
    files = image_files(path) if path.is_dir() else [path]
    if path.is_dir() and not files:
        raise ValueError(f"{path}: folder holds no images to digest")
    for file in files:
        if path.is_dir():
            # name and length first so ("a", "bc") and ("ab", "c") cannot hash the same
            h.update(file.name.encode() + b"\0" + file.stat().st_size.to_bytes(8, "little"))
        with open(file, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    return h.hexdigest()


# What a local model's latents depend on: weights, configs (model, scheduler), tokenizer vocabulary
MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".yaml", ".yml", ".txt")


def model_file_stats(source: str | os.PathLike) -> list[list] | None:
    """[relative path, size, mtime_ns] of each weight and config file of a local model (a
    diffusers folder or one ldm file), by path; None when `source` is no local path (a hub id).

    A local path names a place, not weights: a fine-tune saved over the old one, or a variant
    downloaded into the same folder, must not reuse latents inverted with the old weights. Hashing
    gigabytes at every run would cost more than the inversion it saves, so size and modification
    time stand in for the bytes; touching a file unchanged costs one re-inversion, never a wrong edit.
    """
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        files, base = [path], path.parent
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in MODEL_FILE_SUFFIXES and p.is_file())
        base = path
    else:
        return None
    stats = []
    for file in files:
        st = file.stat()  # follows links: a hub snapshot's files are links to its blobs
        stats.append([file.relative_to(base).as_posix(), st.st_size, st.st_mtime_ns])
    return stats


def key_fields(
    *, video_digest: str, indices: list[int], size: tuple[int, int], model_id: str,
    inversion_steps: int, keep_timesteps: list[int], prompt: str, extra: dict | None = None,
    model_files: list[list] | None = None, ddpm: dict | None = None,
) -> dict:
    """The cache key's fields as one canonical, JSON-ready dict (validated). `model_files`: what
    `model_file_stats` says of a local model (None for a hub id or the built-in tiny model).
    `ddpm`: what a DDPM inversion's noise maps depend on beyond the rest (None: a DDIM inversion,
    whose fields then have no `ddpm` entry at all, as before DDPM existed)."""
    def ints(values, what):
        values = list(values)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{what} must be ints, got {values!r}")
        return values

    if not isinstance(video_digest, str) or not video_digest:
        raise ValueError(f"video_digest must be a non-empty string, got {video_digest!r}")
    size = ints(size, "size")
    if len(size) != 2:
        raise ValueError(f"size must be (height, width), got {size!r}")
    if not isinstance(inversion_steps, int) or inversion_steps < 1:
        raise ValueError(f"inversion_steps must be an int >= 1, got {inversion_steps!r}")
    for entry in model_files or []:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], str)):
            raise ValueError(f"model_files entries must be [path, size, mtime_ns] (see model_file_stats), got {entry!r}")
        ints(entry[1:], f"size and mtime_ns of model file {entry[0]}")
    fields = {
        "video_digest": video_digest,
        "indices": ints(indices, "indices"),
        "size": size,
        "model_id": str(model_id),
        "model_files": None if model_files is None else [list(f) for f in model_files],
        "inversion_steps": inversion_steps,
        "keep_timesteps": sorted(ints(keep_timesteps, "keep_timesteps")),
        "prompt": str(prompt),
        "extra": dict(extra or {}),
    }
    if ddpm is not None:
        if not isinstance(ddpm, dict) or not ddpm:
            raise ValueError(f"ddpm must be a non-empty dict of the noise maps' settings, got {ddpm!r}")
        fields["ddpm"] = dict(ddpm)
    try:
        json.dumps(fields, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cache key fields must be JSON-serialisable ({e}); extra={extra!r}") from None
    return fields


def cache_key(
    *, video_digest: str, indices: list[int], size: tuple[int, int], model_id: str,
    inversion_steps: int, keep_timesteps: list[int], prompt: str, extra: dict | None = None,
    model_files: list[list] | None = None, ddpm: dict | None = None,
) -> str:
    """A short sha256 hex naming the inversion of exactly this clip, selection, size and model."""
    fields = key_fields(
        video_digest=video_digest, indices=indices, size=size, model_id=model_id,
        inversion_steps=inversion_steps, keep_timesteps=keep_timesteps, prompt=prompt, extra=extra,
        model_files=model_files, ddpm=ddpm,
    )
    return _hash_fields(fields)


def _hash_fields(fields: dict) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:KEY_LENGTH]


class InversionCache:
    """The cached latents of one key: `has`, `load` (and `load_noise_maps`), `save` per frame, `missing`, `clear`.

    `fields` (from `key_fields`) are written to meta.json and into every frame file; when they are
    known, a frame file counts as present only if it holds every kept timestep. Frame numbers `i`
    are whatever the caller uses consistently (the pipeline uses the position in the selection;
    the key already pins which source frames those are).
    """

    def __init__(self, root: Path | str | None, key: str, fields: dict | None = None):
        if not isinstance(key, str) or not key or not all(ch.isalnum() or ch in "-_" for ch in key):
            raise ValueError(f"cache key must be a non-empty [A-Za-z0-9_-] string (a folder name), got {key!r}")
        if fields is not None and _hash_fields(fields) != key:
            raise ValueError(f"cache key {key} does not match its fields (their key is {_hash_fields(fields)})")
        self.root = default_cache_root() if root is None else Path(root)
        self.key = key
        self.dir = self.root / key
        self._fields = fields

    @classmethod
    def for_run(cls, root: Path | str | None = None, **fields) -> InversionCache:
        """The cache for these key fields (same keywords as `cache_key`)."""
        canonical = key_fields(**fields)
        return cls(root, _hash_fields(canonical), canonical)

    @property
    def fields(self) -> dict | None:
        """The key fields: given, or read back from meta.json; None when neither."""
        if self._fields is None and (self.dir / "meta.json").is_file():
            try:
                self._fields = json.loads((self.dir / "meta.json").read_text())["fields"]
            except (json.JSONDecodeError, KeyError, TypeError):
                warnings.warn(f"{self.dir / 'meta.json'}: unreadable, ignoring it", stacklevel=2)
        return self._fields

    def frame_path(self, i: int) -> Path:
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ValueError(f"frame number must be an int >= 0, got {i!r}")
        return self.dir / f"frame_{i:05d}.safetensors"

    # ------------------------------------------------------------------ queries

    def has(self, i: int) -> bool:
        """True when frame i's file exists and is whole; a broken file warns and counts as missing."""
        path = self.frame_path(i)
        if not path.is_file():
            return False
        try:
            self._check_file(path)
        except CacheError as e:
            warnings.warn(f"{e}; treating frame {i} as missing, it will be recomputed", stacklevel=2)
            return False
        return True

    def missing(self, frames: list[int]) -> list[int]:
        """The frames of `frames` that have no usable file (in the given order)."""
        return [i for i in frames if not self.has(i)]

    def load(self, i: int, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
             kind: str = "t") -> dict[int, torch.Tensor]:
        """{timestep: latent [4, h, w]} of frame i, by increasing timestep (kind="z": its noise maps)."""
        from safetensors import safe_open

        path = self.frame_path(i)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: frame {i} is not in the inversion cache {self.dir}")
        names = self._check_file(path)
        out = {}
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name in (n for n in names if n[0] == kind):
                    t = f.get_tensor(name)
                    out[int(name[1:])] = t if dtype is None else t.to(dtype)
        except Exception as e:  # the safetensors library raises its own (Rust) error types
            raise CacheError(f"{path}: unreadable inversion cache file ({e})") from None
        return dict(sorted(out.items()))

    def load_noise_maps(self, i: int, *, device: str | torch.device = "cpu") -> dict[int, torch.Tensor]:
        """{timestep: noise map z_t [4, h, w]} of frame i (a DDPM inversion), by increasing timestep."""
        return self.load(i, device=device, kind="z")

    def _check_file(self, path: Path) -> list[str]:
        """The tensor names of a whole file of this key, or CacheError saying what is wrong."""
        from safetensors import safe_open

        try:
            header = safetensors_header(path)
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except Exception as e:
            raise CacheError(f"{path}: corrupt or truncated inversion cache file ({e})") from None
        if metadata.get("key") != self.key:
            raise CacheError(f"{path}: belongs to cache key {metadata.get('key')!r}, not {self.key}")
        names = [n for n in header if n[:1] in ("t", "z") and n[1:].isdigit()]
        if len(names) != len(header) or not any(n[0] == "t" for n in names):
            raise CacheError(f"{path}: expected tensors named t<timestep> (and z<timestep>), found {sorted(header)}")
        fields = self.fields
        if fields is not None:
            kinds = ("t", "z") if "ddpm" in fields else ("t",)
            for kind in kinds:
                absent = sorted(set(fields["keep_timesteps"]) - {int(n[1:]) for n in names if n[0] == kind})
                if absent:
                    raise CacheError(f"{path}: lacks kept {'noise map' if kind == 'z' else 'timestep'}(s) {absent}")
        return names

    # ------------------------------------------------------------------ writes

    def save(self, i: int, latents: dict[int, torch.Tensor], noise_maps: dict[int, torch.Tensor] | None = None) -> Path:
        """Write frame i's {timestep: latent [4, h, w]} (and a DDPM inversion's {timestep: noise map
        [4, h, w]}) atomically (temp file, then rename): both are in the file or neither is."""
        from safetensors.torch import save_file

        path = self.frame_path(i)
        if not isinstance(latents, dict) or not latents:
            raise ValueError(f"latents for frame {i} must be a non-empty {{timestep: tensor}} dict")
        if noise_maps is not None and (not isinstance(noise_maps, dict) or set(noise_maps) != set(latents)):
            raise ValueError(f"noise maps for frame {i} must be a {{timestep: tensor}} dict of the latents' timesteps "
                             f"{sorted(latents)}, got {sorted(noise_maps) if isinstance(noise_maps, dict) else type(noise_maps)}")
        fields = self.fields
        if fields is not None and ("ddpm" in fields) != (noise_maps is not None):
            raise ValueError(f"frame {i}: a {'DDPM' if 'ddpm' in fields else 'DDIM'} inversion cache "
                             f"{'needs' if 'ddpm' in fields else 'holds no'} noise maps ({self.dir})")
        shapes = set()
        for t, z in list(latents.items()) + list((noise_maps or {}).items()):
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise ValueError(f"frame {i}: timestep keys must be ints >= 0, got {t!r}")
            if not isinstance(z, torch.Tensor) or z.ndim != 3:
                raise ValueError(f"frame {i}, t={t}: latent must be a tensor [4, h, w], got {getattr(z, 'shape', type(z))}")
            shapes.add(tuple(z.shape))
        if len(shapes) > 1:
            raise ValueError(f"frame {i}: latents of different shapes {sorted(shapes)}")

        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_meta()
        tensors = {f"t{t}": z.detach().to("cpu").contiguous() for t, z in sorted(latents.items())}
        tensors.update({f"z{t}": z.detach().to("cpu").contiguous() for t, z in sorted((noise_maps or {}).items())})
        metadata = {"key": self.key, "frame": str(i)}
        if self.fields is not None:
            metadata["fields"] = json.dumps(self.fields, sort_keys=True)
        tmp = path.with_name(f"{path.name}.{_owner().replace(' ', '.')}.tmp")  # unique per process, also across hosts
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def _write_meta(self) -> None:
        """Write meta.json unless it already says the same; refuse one that describes other fields."""
        meta_path = self.dir / "meta.json"
        fields = self.fields  # given, or what meta.json already holds
        try:
            old = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        except json.JSONDecodeError:
            old = None  # a broken meta.json is simply rewritten
        if isinstance(old, dict) and old.get("key") == self.key:
            if old.get("fields") == fields or fields is None:
                return
            if old.get("fields") is not None:
                raise CacheError(f"{meta_path}: describes other key fields than this run's; remove {self.dir}")
        tmp = meta_path.with_name(f"meta.json.{_owner().replace(' ', '.')}.tmp")
        tmp.write_text(json.dumps({"key": self.key, "fields": fields}, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, meta_path)

    def clear(self) -> None:
        """Delete every cached frame of this key (for a forced re-inversion)."""
        if self.dir.exists():
            shutil.rmtree(self.dir)

    # ------------------------------------------------------------------ claims (concurrent runs)

    def claim_path(self, i: int) -> Path:
        return self.frame_path(i).with_suffix(".claim")

    def claim(self, frames: list[int]) -> list[int]:
        """Claim the frames of `frames` that no live run has claimed and no file holds yet -> the
        ones now this process's to compute (release them with `release`, also on failure)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        mine = []
        for i in frames:
            path = self.claim_path(i)
            if self._stale(path):
                path.unlink(missing_ok=True)  # its owner is gone: take the frame over
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                continue  # another live run computes it
            with os.fdopen(fd, "w") as f:
                f.write(_owner())
            if self.has(i):  # finished by another run between our `missing` and this claim
                path.unlink(missing_ok=True)
                continue
            mine.append(i)
        return mine

    def release(self, frames: list[int]) -> None:
        """Drop this process's claims on `frames` (saved or given up)."""
        for i in frames:
            path = self.claim_path(i)
            if _read(path) == _owner():
                path.unlink(missing_ok=True)

    def refresh(self, frames: list[int]) -> None:
        """Tell runs on other hosts that this process still works on its claimed `frames`."""
        for i in frames:
            path = self.claim_path(i)
            if _read(path) == _owner():
                os.utime(path)

    def wait(self, frames: list[int], poll_s: float = CLAIM_POLL_S) -> list[int]:
        """Wait until each of `frames` (claimed by other runs) has its file or lost its owner ->
        the frames still missing, whose owner died without saving them (claim them again)."""
        waiting = list(frames)
        while waiting:
            waiting = [i for i in waiting if not self.has(i) and self.claim_path(i).exists() and not self._stale(self.claim_path(i))]
            if waiting:
                time.sleep(poll_s)
        return [i for i in frames if not self.has(i)]

    @staticmethod
    def _stale(path: Path) -> bool:
        """True when the claim at `path` belongs to a process that is gone."""
        owner = _read(path)
        if owner is None:
            return False  # no claim, or one being written this instant
        host, _, pid = owner.rpartition(" ")
        if host == socket.gethostname() and pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False  # alive, another user's
            return False
        try:
            return time.time() - path.stat().st_mtime > CLAIM_STALE_S
        except FileNotFoundError:
            return False


def _owner() -> str:
    """This process, as a claim file names it: "<host> <pid>"."""
    return f"{socket.gethostname()} {os.getpid()}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text() or None
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def open_for_run(cfg, video, positions: list[int], timesteps: list[int], dtype: torch.dtype, *,
                 may_clear: bool = True) -> InversionCache | None:
    """The cache of cfg's run (None with inversion.cache=false), keyed by everything its latents
    depend on. `cfg`: tokenflow.config.RunConfig; `video`: the media.Video read for it; `positions`:
    the frames of the selection that are inverted; `timesteps`: the sampling timesteps kept.
    `may_clear`: inversion.force empties it (only one process of a torchrun launch may)."""
    if not cfg.inversion.cache:
        return None
    model = cfg.model
    random = model.source == "random"
    from .media import READER_VERSION

    inv = cfg.inversion
    ddpm = None
    if inv.method == "ddpm":  # what the noise maps depend on beyond the DDIM key's fields
        ddpm = {"noise_seed": inv.noise_seed, "shared_noise": inv.shared_noise,
                "source_guidance_scale": float(inv.source_guidance_scale),
                # the guided maps read the negative prompt's branch too; without guidance they do not
                "negative_prompt": cfg.negative_prompt if inv.source_guidance_scale != 1 else None}

    cache = InversionCache.for_run(
        cfg.inversion.cache_dir, video_digest=video_digest(video.path), indices=[video.indices[i] for i in positions],
        size=[video.height, video.width], model_id=model.name if random else str(model.source),
        # DDPM: the grid is the sampling grid (inversion.steps is not used)
        inversion_steps=cfg.steps if ddpm else inv.steps, keep_timesteps=list(timesteps), prompt=cfg.inversion_prompt,
        model_files=None if random else model_file_stats(model.source),  # a local path alone does not say which weights are there now
        extra={"dtype": str(dtype).replace("torch.", ""), "seed": model.seed if random else None,
               "variant": model.variant, "prediction_type": model.prediction_type,
               "reader": READER_VERSION},  # how the file's frames were read (media/reading.py)
        ddpm=ddpm,
    )
    if cfg.inversion.force and may_clear:
        cache.clear()
    return cache
