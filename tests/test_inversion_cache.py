"""Inversion cache: exact roundtrip, keys that change with every input, crash recovery."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tokenflow.inversion_cache import (
    InversionCache, cache_key, default_cache_root, key_fields, model_file_stats, video_digest,
)

FIELDS = dict(
    video_digest="ab" * 32, indices=[0, 2, 4, 6], size=(512, 512), model_id="stabilityai/stable-diffusion-2-1-base",
    inversion_steps=50, keep_timesteps=[981, 961, 1], prompt="a wolf", extra=None,
)


def latents(seed: int, timesteps=(981, 961, 1), dtype=torch.float32) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {t: torch.randn(4, 8, 8, generator=g).to(dtype) for t in timesteps}


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_save_load_roundtrip_is_exact(tmp_path, dtype):
    cache = InversionCache.for_run(tmp_path, **FIELDS)
    saved = latents(0, dtype=dtype)
    path = cache.save(3, saved)
    assert path.name == "frame_00003.safetensors"
    assert cache.has(3) and not cache.has(2)
    loaded = cache.load(3)
    assert list(loaded) == [1, 961, 981]  # by increasing timestep
    for t in saved:
        assert loaded[t].dtype == dtype
        assert torch.equal(loaded[t], saved[t])
    assert cache.load(3, dtype=torch.float32)[1].dtype == torch.float32
    assert files(cache.dir) == ["frame_00003.safetensors", "meta.json"]  # no *.tmp left


def test_metadata_on_disk_describes_the_key(tmp_path):
    cache = InversionCache.for_run(tmp_path, **FIELDS)
    cache.save(0, latents(0))
    meta = json.loads((cache.dir / "meta.json").read_text())
    assert meta["key"] == cache.key == cache_key(**FIELDS)
    assert meta["fields"]["prompt"] == "a wolf" and meta["fields"]["keep_timesteps"] == [1, 961, 981]
    with safe_open(str(cache.frame_path(0)), framework="pt") as f:
        md = f.metadata()
    assert md["key"] == cache.key and md["frame"] == "0"
    assert json.loads(md["fields"]) == meta["fields"]
    # a cache opened by key alone finds its fields again from meta.json
    assert InversionCache(tmp_path, cache.key).fields == meta["fields"]


def test_key_changes_when_any_field_changes():
    base = cache_key(**FIELDS)
    assert len(base) == 16 and int(base, 16) >= 0
    assert cache_key(**FIELDS) == base
    assert cache_key(**{**FIELDS, "keep_timesteps": [1, 981, 961]}) == base  # a set of timesteps: order is noise
    changes = dict(
        video_digest="cd" * 32, indices=[0, 2, 4], size=(512, 576), model_id="other/model",
        inversion_steps=25, keep_timesteps=[981, 961], prompt="a dog", extra={"guidance": 1.0},
    )
    keys = {base}
    for name, value in changes.items():
        key = cache_key(**{**FIELDS, name: value})
        assert key not in keys, f"changing {name} did not change the key"
        keys.add(key)
    assert cache_key(**{**FIELDS, "indices": [6, 4, 2, 0]}) != base  # frame order matters


def touch(path: Path, seconds_later: int = 1) -> None:
    """Move the file's modification time on, its bytes unchanged."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds_later * 10**9))


def test_key_follows_a_local_models_weight_files(tmp_path):
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"w" * 100)
    (folder / "unet" / "config.json").write_text("{}")
    (folder / "README.md").write_text("notes")

    def key(source=folder):
        return cache_key(**{**FIELDS, "model_id": str(source), "model_files": model_file_stats(source)})

    base = key()
    assert key() == base
    assert [entry[0] for entry in model_file_stats(folder)] == ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    (folder / "README.md").write_text("other notes")
    assert key() == base  # neither weights nor a config
    touch(weights)
    touched = key()
    assert touched != base  # same bytes, but nothing cheap tells them from new ones
    weights.write_bytes(b"v" * 101)  # replaced weights at the same path
    assert key() not in (base, touched)
    touched = key()
    touch(folder / "unet" / "config.json")
    assert key() != touched

    single = tmp_path / "v2-1_512-ema-pruned.safetensors"  # an ldm file
    single.write_bytes(b"x" * 10)
    before = key(single)
    touch(single)
    assert key(single) != before
    assert model_file_stats("owner/hub-model") is None  # a hub id: keyed by its name


def test_bad_key_fields_are_named():
    with pytest.raises(ValueError, match="indices"):
        cache_key(**{**FIELDS, "indices": [0, 1.5]})
    with pytest.raises(ValueError, match="JSON"):
        cache_key(**{**FIELDS, "extra": {"x": object()}})
    with pytest.raises(ValueError, match="model_files"):
        cache_key(**{**FIELDS, "model_files": [["unet.safetensors", 10]]})
    with pytest.raises(ValueError, match="model file unet.safetensors"):
        cache_key(**{**FIELDS, "model_files": [["unet.safetensors", 10, 1.5]]})
    with pytest.raises(ValueError, match="does not match"):
        InversionCache(Path("/tmp"), "0" * 16, key_fields(**FIELDS))
    with pytest.raises(ValueError, match="cache key"):
        InversionCache(Path("/tmp"), "../escape")


def test_truncated_file_counts_as_missing_with_a_warning(tmp_path):
    cache = InversionCache.for_run(tmp_path, **FIELDS)
    for i in range(3):
        cache.save(i, latents(i))
    path = cache.frame_path(1)
    path.write_bytes(path.read_bytes()[:-100])  # e.g. a full disk while copying
    with pytest.warns(UserWarning, match=r"frame_00001.*truncated"):
        assert cache.missing([0, 1, 2]) == [1]
    with pytest.raises(ValueError, match="frame_00001"):
        cache.load(1)
    cache.save(1, latents(1))  # the rerun overwrites it
    assert cache.missing([0, 1, 2]) == []
    assert torch.equal(cache.load(1)[981], latents(1)[981])


@pytest.mark.parametrize("content", [b"", b"garbage", b"\xff" * 64])
def test_garbage_file_counts_as_missing(tmp_path, content):
    cache = InversionCache.for_run(tmp_path, **FIELDS)
    cache.dir.mkdir(parents=True)
    cache.frame_path(0).write_bytes(content)
    with pytest.warns(UserWarning, match="frame_00000"):
        assert not cache.has(0)


def test_file_lacking_a_kept_timestep_or_of_another_key_is_missing(tmp_path):
    cache = InversionCache.for_run(tmp_path, **FIELDS)
    cache.save(0, latents(0, timesteps=(981, 961)))
    with pytest.warns(UserWarning, match=r"lacks kept timestep\(s\) \[1\]"):
        assert not cache.has(0)

    other = InversionCache.for_run(tmp_path, **{**FIELDS, "prompt": "a dog"})
    other.save(1, latents(1))
    cache.frame_path(1).write_bytes(other.frame_path(1).read_bytes())  # a file copied from elsewhere
    with pytest.warns(UserWarning, match="belongs to cache key"):
        assert not cache.has(1)


def test_missing_after_a_partial_run(tmp_path):
    cache = InversionCache.for_run(tmp_path, **FIELDS)
    assert cache.missing([0, 1, 2, 3, 4]) == [0, 1, 2, 3, 4]
    assert not cache.dir.exists()  # looking creates nothing
    for i in (0, 2):
        cache.save(i, latents(i))
    (cache.dir / "frame_00003.safetensors.123.tmp").write_bytes(b"half")  # left by a crash mid-write
    # a new process with the same inputs sees the same key and the finished frames
    again = InversionCache.for_run(tmp_path, **FIELDS)
    assert again.key == cache.key
    assert again.missing([0, 1, 2, 3, 4]) == [1, 3, 4]
    assert again.missing([4, 2, 1]) == [4, 1]
    with pytest.raises(FileNotFoundError, match="frame_00004"):
        again.load(4)


def test_clear(tmp_path):
    cache = InversionCache.for_run(tmp_path, **FIELDS)
    cache.save(0, latents(0))
    other = InversionCache.for_run(tmp_path, **{**FIELDS, "inversion_steps": 10})
    other.save(0, latents(0))
    cache.clear()
    assert cache.missing([0]) == [0] and not cache.dir.exists()
    assert other.has(0)  # only this key's folder goes
    cache.clear()  # clearing an empty cache is fine


def test_save_rejects_bad_latents(tmp_path):
    cache = InversionCache.for_run(tmp_path, **FIELDS)
    with pytest.raises(ValueError, match="non-empty"):
        cache.save(0, {})
    with pytest.raises(ValueError, match=r"t=981.*\[4, h, w\]"):
        cache.save(0, {981: torch.zeros(1, 4, 8, 8)})
    with pytest.raises(ValueError, match="different shapes"):
        cache.save(0, {981: torch.zeros(4, 8, 8), 1: torch.zeros(4, 8, 9)})
    with pytest.raises(ValueError, match="timestep keys"):
        cache.save(0, {"981": torch.zeros(4, 8, 8)})
    with pytest.raises(ValueError, match="frame number"):
        cache.save(-1, latents(0))
    assert not cache.frame_path(0).exists()


def test_default_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENFLOW_CACHE", str(tmp_path / "c"))
    assert default_cache_root() == tmp_path / "c"
    assert InversionCache(None, "abc").dir == tmp_path / "c" / "abc"
    monkeypatch.delenv("TOKENFLOW_CACHE")
    assert default_cache_root() == Path.home() / ".cache" / "tokenflow" / "inversions"


def test_video_digest_of_file_and_folder(tmp_path):
    a = tmp_path / "a.mp4"
    a.write_bytes(b"\x00" * 3_000_000 + b"end")  # more than one read chunk
    b = tmp_path / "b.mp4"
    b.write_bytes(a.read_bytes())
    assert video_digest(a) == video_digest(b)
    assert len(video_digest(a)) == 64
    b.write_bytes(b"\x00" * 3_000_000 + b"enD")
    assert video_digest(a) != video_digest(b)

    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "00000.png").write_bytes(b"one")
    (folder / "00001.png").write_bytes(b"two")
    d = video_digest(folder)
    (folder / "notes.txt").write_text("not a frame")
    assert video_digest(folder) == d  # only the frames count
    (folder / "00001.png").write_bytes(b"tw0")
    assert video_digest(folder) != d
    (folder / "00001.png").write_bytes(b"two")
    (folder / "00001.png").rename(folder / "00002.png")
    assert video_digest(folder) != d  # renaming a frame changes it too
    with pytest.raises(FileNotFoundError, match="nope"):
        video_digest(tmp_path / "nope.mp4")


def test_cache_by_key_alone_works_without_fields(tmp_path):
    cache = InversionCache(tmp_path, "manual-key")
    cache.save(0, latents(0, timesteps=(5,)))  # no fields: any timesteps count as whole
    assert cache.has(0) and list(cache.load(0)) == [5]
    assert json.loads((cache.dir / "meta.json").read_text()) == {"key": "manual-key", "fields": None}


# ---------------------------------------------------------------------------------------------
# DDPM inversions: noisy versions and noise maps in one file, keyed apart from DDIM

DDPM = {"noise_seed": 0, "shared_noise": True, "source_guidance_scale": 1.0, "negative_prompt": None}


def test_ddpm_key_never_meets_a_ddim_key_and_follows_each_setting():
    ddim = cache_key(**FIELDS)
    ddpm = cache_key(**FIELDS, ddpm=DDPM)
    assert ddpm != ddim
    assert "ddpm" not in key_fields(**FIELDS)  # a DDIM key's fields are as they always were
    keys = {ddim, ddpm}
    for name, value in [("noise_seed", 1), ("shared_noise", False), ("source_guidance_scale", 3.5), ("negative_prompt", "blurry")]:
        key = cache_key(**FIELDS, ddpm={**DDPM, name: value})
        assert key not in keys, f"changing {name} did not change the key"
        keys.add(key)
    with pytest.raises(ValueError, match="ddpm"):
        cache_key(**FIELDS, ddpm={})


def test_ddpm_frame_holds_latents_and_maps_exactly(tmp_path):
    cache = InversionCache.for_run(tmp_path, **FIELDS, ddpm=DDPM)
    xs, zs = latents(0), latents(1)
    cache.save(2, xs, noise_maps=zs)
    assert cache.has(2) and files(cache.dir) == ["frame_00002.safetensors", "meta.json"]
    loaded, maps = cache.load(2), cache.load_noise_maps(2)
    assert list(loaded) == list(maps) == [1, 961, 981]
    assert all(torch.equal(loaded[t], xs[t]) and torch.equal(maps[t], zs[t]) for t in xs)
    with safe_open(str(cache.frame_path(2)), framework="pt") as f:
        assert sorted(f.keys()) == ["t1", "t961", "t981", "z1", "z961", "z981"]


def test_ddpm_frame_without_every_map_is_missing_and_kinds_are_not_mixed(tmp_path):
    ddpm = InversionCache.for_run(tmp_path, **FIELDS, ddpm=DDPM)
    ddim = InversionCache.for_run(tmp_path, **FIELDS)
    with pytest.raises(ValueError, match="DDPM inversion cache needs noise maps"):
        ddpm.save(0, latents(0))
    with pytest.raises(ValueError, match="DDIM inversion cache holds no noise maps"):
        ddim.save(0, latents(0), noise_maps=latents(1))
    with pytest.raises(ValueError, match="latents' timesteps"):
        ddpm.save(0, latents(0), noise_maps=latents(1, timesteps=(981, 961)))
    assert not ddpm.frame_path(0).exists() and not ddim.frame_path(0).exists()
    # a file with a map missing (written by other code, or another key's copied in) counts as missing
    from safetensors.torch import save_file

    ddpm.dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"t{t}": x for t, x in latents(0).items()} | {"z981": torch.zeros(4, 8, 8), "z961": torch.zeros(4, 8, 8)}
    save_file(tensors, str(ddpm.frame_path(1)), metadata={"key": ddpm.key, "frame": "1"})
    with pytest.warns(UserWarning, match=r"lacks kept noise map\(s\) \[1\]"):
        assert not ddpm.has(1)
    ddim.save(3, latents(3))
    ddpm.frame_path(3).write_bytes(ddim.frame_path(3).read_bytes())  # a DDIM frame copied into the DDPM cache
    with pytest.warns(UserWarning, match="belongs to cache key"):
        assert not ddpm.has(3)
