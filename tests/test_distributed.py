"""One video across two processes (torchrun, gloo, CPU, tiny model, 24 frames of the wolf clip):
the edited latents equal the single-process run's to 1e-5 with each rank having computed half of the
frames; the same CLI under torchrun writes one run folder whose frames match the single process's
and whose run facts name each rank's frames and timings. Plus the shard arithmetic on its own.

This file is also the torchrun worker of the latent-level test (run as a script)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WOLF = REPO.parent / "shared" / "data" / "wolf.mp4"
OVERRIDES = ["model=tiny", "frames.max=24", "size=64", "steps=4", "inversion.steps=8", "device=cpu", "progress=false",
             "output.side_by_side=false",
             # batches that split the same way in one process and in each half (1 frame per propagation forward,
             # 4 per inversion/VAE forward): a different batch composition changes float rounding (6e-5 seen at 5)
             "tokenflow.batch_size=1", "inversion.batch_size=4"]


def torchrun(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def edit_latents(overrides: list[str], ranks=None):
    """The original video prepared whole, then Alg. 1's loop as run_edit drives it: alone, or (ranks)
    through a LoopWatch over this rank's FrameShard, holding only its own rows of the clip (the
    others zero, so every keyframe row the loop reads must come through the keyframe exchange).
    -> (edited latents of this process's rows, its frames)."""
    from tokenflow.config import load_config
    from tokenflow.edit import EditSettings, LoopWatch, edit_video_latents
    from tokenflow.source import prepare_source

    cfg = load_config(overrides)
    src = prepare_source(cfg)
    n = src.clean.shape[0]
    settings, unet, schedule = EditSettings.from_config(cfg), src.models.unet, src.models.config.schedule
    if ranks is None:
        latents, _ = edit_video_latents(unet, schedule, settings, src.prompts, src.source_latents, src.clean, src.timesteps)
        return latents, list(range(n))
    shard = ranks.shard(n)
    own = {t: x[shard.frames] for t, x in src.source_latents.items()}
    latents, _ = edit_video_latents(unet, schedule, settings, src.prompts, shard.full_source(own),
                                    shard.full(src.clean[shard.frames]), src.timesteps, LoopWatch(shard))
    return shard.own_rows(latents), shard


def worker(out: str, overrides_json: str) -> None:
    """torchrun worker: the sharded edit; rank 0 saves the gathered latents and each rank's frames."""
    from tokenflow.distributed import Ranks

    torch.set_num_threads(1)
    ranks = Ranks.from_env("cpu")
    latents, shard = edit_latents(json.loads(Path(overrides_json).read_text()), ranks)
    whole = shard.gather_to_root(latents)
    frames = ranks.all_gather(shard.frames)
    rows = ranks.all_gather(latents.shape[0])
    if ranks.is_root:
        torch.save({"latents": whole, "frames": frames, "rows": rows}, out)
    ranks.close()


@pytest.fixture
def wolf():
    if not WOLF.is_file():
        pytest.skip(f"{WOLF} not present (the real sample clips live beside the repository)")
    return WOLF


def test_two_ranks_give_the_single_process_latents(tmp_path, wolf):
    overrides = [f"video={wolf}", *OVERRIDES, "inversion.cache=false"]
    (tmp_path / "overrides.json").write_text(json.dumps(overrides))
    proc = torchrun([__file__, str(tmp_path / "out.pt"), str(tmp_path / "overrides.json")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["frames"] == [list(range(12)), list(range(12, 24))]  # each rank computed half of the frames
    assert got["rows"] == [12, 12]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: another thread count splits the CPU's sums differently
    try:
        ref, _ = edit_latents(overrides)  # the single process
    finally:
        torch.set_num_threads(threads)
    assert ref.shape == got["latents"].shape == (24, 4, 8, 8)
    torch.testing.assert_close(got["latents"], ref, rtol=0, atol=1e-5)


def test_torchrun_cli_writes_one_run_with_each_ranks_facts(tmp_path, wolf):
    args = [f"video={wolf}", *OVERRIDES, "output.png_frames=true", f"inversion.cache_dir={tmp_path / 'cache'}"]
    # each rank's Hydra names a run dir by its own clock (microseconds here, so they differ)
    proc = torchrun(["-m", "tokenflow.cli", *args, "hydra.run.dir=dist/${now:%H-%M-%S-%f}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "tokenflow.cli", *args, "hydra.run.dir=single", "inversion.cache=false"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert single.returncode == 0, single.stderr[-3000:]
    runs = list((tmp_path / "dist").iterdir())
    assert len(runs) == 1  # rank 1's own folder (only Hydra's files) was removed; rank 0's holds the outputs
    facts = json.loads((runs[0] / "run.json").read_text())
    assert facts["frames"] == 24
    assert [(r["rank"], r["frames"], r["first_frame"], r["last_frame"]) for r in facts["ranks"]] == [(0, 12, 0, 11), (1, 12, 12, 23)]
    assert all("editing" in r["timings_s"] and "inversion" in r["timings_s"] for r in facts["ranks"])
    from PIL import Image

    def frames(run):
        return np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / run / "frames").glob("*.png"))]).astype(int)

    a, b = frames(runs[0].relative_to(tmp_path)), frames("single")
    assert a.shape == b.shape == (24, 64, 64, 3)
    assert np.abs(a - b).max() <= 1  # equal latents to 1e-5: at most a rounding step apart in uint8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "dist", "single"]  # one folder per run, no stray


def test_torchrun_refuses_extended_all(tmp_path, wolf):
    proc = torchrun(["-m", "tokenflow.cli", f"video={wolf}", *OVERRIDES, "tokenflow.mode=extended_all", "hydra.run.dir=x"], cwd=tmp_path)
    assert proc.returncode != 0 and "extended_all" in proc.stderr and "one process" in proc.stderr


def test_shards_are_contiguous_and_cover_the_clip():
    from tokenflow.distributed import FrameShard, Ranks

    for n, world in [(24, 2), (25, 3), (40, 7), (5, 5)]:
        shards = [FrameShard(Ranks(rank=r, world_size=world, local_rank=r, comm_device="cpu"), n) for r in range(world)]
        assert sum((s.frames for s in shards), []) == list(range(n))
        assert max(len(s.frames) for s in shards) - min(len(s.frames) for s in shards) <= 1
        assert all(s.owner(i) == r for r, s in enumerate(shards) for i in s.frames)
    with pytest.raises(ValueError, match="cannot be shared by 3 ranks"):
        Ranks(rank=0, world_size=3, local_rank=0, comm_device="cpu").shard(2)


if __name__ == "__main__":
    worker(*sys.argv[1:])


def test_torchrun_ddpm_with_reconstruction_matches_one_process(tmp_path, wolf):
    """DDPM's per-frame noise does not depend on which rank inverts a frame: two ranks compute the same
    noisy versions and maps as one process, count the same forwards and measure the same PSNRs."""
    args = [f"video={wolf}", *OVERRIDES, "frames.max=8", "inversion.method=ddpm", "output.reconstruction=true",
            "inversion.shared_noise=false", "output.png_frames=true", f"inversion.cache_dir={tmp_path / 'cache'}"]
    proc = torchrun(["-m", "tokenflow.cli", *args, "hydra.run.dir=dist"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "tokenflow.cli", *args[:-1], "hydra.run.dir=single",
                             f"inversion.cache_dir={tmp_path / 'single_cache'}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert single.returncode == 0, single.stderr[-3000:]
    dist, one = (json.loads((tmp_path / run / "run.json").read_text()) for run in ("dist", "single"))
    # the same noisy versions and maps, frame by frame, whichever rank inverted the frame
    from tokenflow.inversion_cache import InversionCache

    caches = [InversionCache(Path(facts["inversion_cache"]).parent, Path(facts["inversion_cache"]).name) for facts in (dist, one)]
    assert caches[0].dir != caches[1].dir and caches[0].key == caches[1].key
    for i in range(8):
        for load in ("load", "load_noise_maps"):
            a, b = (getattr(c, load)(i) for c in caches)
            assert list(a) == list(b) and all(torch.equal(a[t], b[t]) for t in a), (i, load)
    for stage in ("inversion", "reconstruction"):  # each frame inverted and sampled back once, by one rank
        assert dist["unet_forwards"][stage] == one["unet_forwards"][stage]
    assert one["unet_forwards"]["reconstruction"]["frame_forwards"] == 8 * 4
    # the edit: the second rank repeats each step's keyframe pass (1 keyframe in 8 frames, 4 steps)
    assert dist["unet_forwards"]["edit"]["frame_forwards"] == one["unet_forwards"]["edit"]["frame_forwards"] + 4
    assert dist["reconstruction_psnr_db"] == pytest.approx(one["reconstruction_psnr_db"], abs=0.01)
    assert dist["vae_round_trip_psnr_db"] == pytest.approx(one["vae_round_trip_psnr_db"], abs=0.01)
    from tokenflow.media import read_video

    a, b = (read_video(tmp_path / run / "reconstruction.mp4").frames.int() for run in ("dist", "single"))
    # the reconstructions agree (their PSNRs above); H.264 may still encode equal frames differently under
    # torchrun (x264 picks its threads by the process's CPUs): as close as two encodes, not bit for bit
    from tokenflow.reconstruction import psnr

    assert a.shape == b.shape == (8, 64, 64, 3) and psnr(a.to(torch.uint8), b.to(torch.uint8)) > 30
