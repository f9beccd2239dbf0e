"""tools.reconstruction_sweep on a tiny clip: one row per inversion asked for, the forwards each
costs per frame as its step counts imply, DDPM's reconstruction as good as the VAE round trip (exact),
and bad step lists refused."""

import pytest

from sampler.ddim import inversion_timesteps
from tests.media_clips import patches, write_clip
from tokenflow.models import build_random
from tools import reconstruction_sweep


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", patches(3, 64, 64), fps=10)


def test_sweep_prints_psnr_and_forwards_of_each_inversion(clip, capsys):
    assert reconstruction_sweep.main(["--video", str(clip), "--model", "tiny", "--size", "64", "--steps", "3",
                                      "--ddim", "3,6", "--ddpm", "2,4"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("| inversion | inversion steps | sampling steps |") and len(out) == 2 + 4
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out[2:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [("DDIM", "3", "3"), ("DDIM", "6", "3"), ("DDPM", "2", "2"), ("DDPM", "4", "4")]
    schedule = build_random("tiny", seed=0).config.schedule
    ddim6 = len(inversion_timesteps(schedule, 6, schedule.timesteps(3).tolist()))  # the 6-step grid with the 3 sampling steps merged
    assert [r[3] for r in rows] == ["3 + 3", f"{ddim6} + 3", "2 + 2", "4 + 4"]
    psnr, vae, against = [float(r[4]) for r in rows], [float(r[5]) for r in rows], [float(r[6]) for r in rows]
    assert len(set(vae)) == 1 and 5 < vae[0] < 100
    assert psnr[2] == pytest.approx(vae[0], abs=0.05) and psnr[3] == pytest.approx(vae[0], abs=0.05)  # DDPM: exact
    # DDIM on a random model, a few steps: not exact (and a random VAE's error may land either side of the source)
    assert all(abs(p - vae[0]) > 0.05 for p in psnr[:2])
    # against the VAE round trip: DDPM's decoded frames are the round trip's but for rounding, DDIM's are not
    assert min(against[2:]) > 40 > 25 > max(against[:2])


def test_sweep_rows_match_the_run_level_reconstruction(clip, tmp_path):
    """The tool and `output.reconstruction=true` measure the same thing."""
    from tests.media_clips import run_config
    from tokenflow.pipeline import run_edit

    rows = reconstruction_sweep.sweep([f"video={clip}", "model=tiny", "size=64", "steps=3", "progress=false"], [4], [3],
                                      say=lambda line: None)
    ddim = run_edit(run_config(tmp_path, f"video={clip}", "steps=3", "output.reconstruction=true"), tmp_path / "ddim")
    ddpm = run_edit(run_config(tmp_path, f"video={clip}", "steps=3", "inversion.method=ddpm", "output.reconstruction=true"),
                    tmp_path / "ddpm")
    assert rows[0].psnr_db == pytest.approx(ddim.reconstruction_psnr_db, abs=1e-3)
    assert rows[1].psnr_db == pytest.approx(ddpm.reconstruction_psnr_db, abs=1e-3)
    assert rows[0].vae_psnr_db == ddim.vae_round_trip_psnr_db == ddpm.vae_round_trip_psnr_db
    assert rows[0].inversion_forwards * 3 == ddim.unet_forwards["inversion"]["sample_forwards"]
    assert rows[1].inversion_forwards * 3 == ddpm.unet_forwards["inversion"]["sample_forwards"]


@pytest.mark.parametrize("flag", [["--ddim", "50,x"], ["--ddpm", "0"]])
def test_bad_step_lists_are_refused(clip, flag, capsys):
    with pytest.raises(SystemExit) as exit:
        reconstruction_sweep.main(["--video", str(clip), "--model", "tiny", *flag])
    assert exit.value.code == 2 and "step counts" in capsys.readouterr().err
