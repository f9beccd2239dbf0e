"""The CUDA path, checked without a GPU (issue 11): CUDA started before an indexed device's peak is
reset, device errors as one line at the command line, one device sync per stage (not per step),
a float32 DDIM state under a bfloat16 UNet (tiny model), and one host copy per inversion batch.
torch.cuda's functions are monkeypatched where a GPU would answer."""

import sys

import pytest
import torch
from media_clips import run_config

from sampler import sample
from tokenflow import cli, device, pipeline
from tokenflow.edit import EditSettings, PromptEmbeddings, edit_start, edit_video_latents
from tokenflow.inversion import decode_latents, encode_frames, invert_frames
from tokenflow.inversion_cache import InversionCache
from tokenflow.media.sample_clip import make_sample_clip
from tokenflow.models import build_random
from tokenflow.device import DeviceError, device_error_line
from tokenflow.measure import PeakMemory, Stopwatch


class FakeCuda:
    """torch.cuda as a CPU-only build cannot be: `count` devices, initialised only by init()."""

    def __init__(self, monkeypatch, count=2, init_error=None):
        self.count, self.init_error = count, init_error
        self.initialised, self.resets, self.syncs = False, [], []
        for name in ("is_available", "init", "device_count", "reset_peak_memory_stats", "max_memory_allocated", "synchronize"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def is_available(self):
        return True

    def init(self):
        if self.init_error:
            raise RuntimeError(self.init_error)
        self.initialised = True

    def device_count(self):
        return self.count

    def reset_peak_memory_stats(self, device=None):
        index = torch.device(device).index
        if index is not None and not self.initialised:  # what PyTorch's allocator says before init
            raise RuntimeError(f"Invalid device argument {index}: did you call init?")
        self.resets.append(device)

    def max_memory_allocated(self, device=None):
        return 3 * 2**20

    def synchronize(self, device=None):
        self.syncs.append(device)


# ----------------------------------------------------------------------------- 1. device start


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_indexed_cuda_device_is_started_before_its_peak_is_reset(monkeypatch, device):
    cuda = FakeCuda(monkeypatch)
    memory = PeakMemory(device)
    assert cuda.initialised and cuda.resets == [device]
    assert memory.report()["cuda_allocated"] == 3.0


def test_device_problems_are_device_errors_naming_the_device(monkeypatch):
    FakeCuda(monkeypatch, count=2)
    with pytest.raises(DeviceError, match=r"device=cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        PeakMemory("cuda:2")
    FakeCuda(monkeypatch, init_error="CUDA driver initialization failed, you might not have a CUDA gpu.\nmore")
    with pytest.raises(DeviceError, match=r"^device=cuda:0: CUDA could not be started \(CUDA driver initialization failed"):
        PeakMemory("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        device.pick_device("cuda:0")


def test_device_error_line_is_one_line_for_device_errors_only():
    assert device_error_line(DeviceError("device=cuda:3: no such device")) == "device=cuda:3: no such device"
    oom = device_error_line(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"))
    assert oom.startswith("CUDA out of memory. Tried to allocate 2.00 GiB (") and "batch_size" in oom and "\n" not in oom
    line = device_error_line(RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors ..."))
    assert line == "device error: CUDA error: an illegal memory access was encountered"
    # a bug is not the device's: it keeps its traceback
    assert device_error_line(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")) is None
    assert device_error_line(ValueError("CUDA")) is None


def test_cli_shows_a_device_error_as_one_line(monkeypatch, tmp_path, capsys):
    FakeCuda(monkeypatch, init_error="CUDA driver initialization failed, you might not have a CUDA gpu.")
    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["tokenflow", "model=tiny", "device=cuda:0", "progress=false",
                                      f"hydra.run.dir={run_dir}", f"inversion.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: device=cuda:0: CUDA could not be started (CUDA driver initialization failed")
    assert not any("Traceback" in line for line in err)
    assert not run_dir.exists()  # nothing was written; Hydra's own folder is removed


# ----------------------------------------------------------------------------- 6. stage timings


def test_stopwatch_waits_for_the_device_once_per_stage(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    watch = Stopwatch("cuda:1")
    for stage in ("read_video", "encode", "inversion"):
        watch.lap(stage)
    assert cuda.syncs == ["cuda:1"] * 3 and list(watch.timings) == ["read_video", "encode", "inversion"]
    cpu = Stopwatch("cpu")
    cpu.lap("encode")
    assert len(cuda.syncs) == 3  # no device, no sync


def test_a_run_syncs_at_stage_boundaries_not_in_its_loops(monkeypatch, tmp_path):
    """run_edit on the CPU with a Stopwatch that believes it times cuda:0: the UNet calls of the
    inversion (2 frames x 4 steps) and of the edit add no sync; each of the eight stages adds one."""
    cuda = FakeCuda(monkeypatch)
    laps = []
    real_lap = Stopwatch.lap

    def lap(self, stage):
        real_lap(self, stage)
        laps.append((stage, len(cuda.syncs)))

    monkeypatch.setattr(Stopwatch, "lap", lap)
    monkeypatch.setattr(pipeline, "Stopwatch", lambda device: Stopwatch("cuda:0"))
    cfg = run_config(tmp_path, "device=cpu", "frames.max=2", "inversion.batch_size=1")
    pipeline.run_edit(cfg, tmp_path / "run")
    stages = ["read_video", "load_models", "encode", "encode_prompts", "inversion", "editing", "decode", "write"]
    assert [s for s, _ in laps] == stages
    assert [n for _, n in laps] == list(range(1, 9))  # one sync per lap, made before its clock is read


# ----------------------------------------------------------------------------- 2. float32 state


def _rmse(a, b):
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def test_bfloat16_tiny_unet_with_a_float32_state_inverts_and_reconstructs_like_float32():
    """DDIM inversion (20 steps) of two unit-variance [4, 8, 8] latents with the tiny UNet, then DDIM
    sampling back, float32 and bfloat16 UNet. Measured (RMSE), bfloat16 with the float32 state vs
    (before) the state kept in bfloat16: x_T from float32's 0.0040 vs 0.0073; reconstruction from
    float32's reconstruction 0.065 vs 0.106; reconstruction error 0.878 vs 0.883, float32's 0.885 (the
    random tiny UNet is no denoiser: its DDIM inversion is far from exact in any dtype). At 50 steps:
    x_T 0.0042 vs 0.0101, from float32's reconstruction 0.075 vs 0.162."""
    clean = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        models = build_random("tiny", dtype=dtype)
        schedule = models.config.schedule
        timesteps = schedule.timesteps(20)
        prompt = torch.randn(1, 77, models.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
        kept = invert_frames(models.unet, schedule, clean, prompt, inversion_steps=20, keep_timesteps=timesteps.tolist(),
                             batch_size=2)
        x_T = kept[int(timesteps[0])]
        assert all(x.dtype == torch.float32 for x in kept.values())

        def model_fn(x, t, unet=models.unet, dtype=dtype):
            return unet(x.to(dtype), t, prompt.to(dtype).expand(x.shape[0], -1, -1))

        with torch.no_grad():
            results[dtype] = x_T, sample(model_fn, x_T, schedule, timesteps)
    (ref_T, ref), (x_T, rec) = results[torch.float32], results[torch.bfloat16]
    assert rec.dtype == torch.float32
    assert _rmse(x_T, ref_T) < 0.0055
    assert _rmse(rec, ref) < 0.085
    assert abs(_rmse(rec, clean) - _rmse(ref, clean)) < 0.03 * _rmse(ref, clean)


@pytest.mark.parametrize("method", ["pnp", "sdedit"])
def test_edit_keeps_float32_latents_between_steps_under_a_bfloat16_unet(method):
    settings = EditSettings(mode="per_frame", method=method, batch_size=2, sdedit_strength=1.0)
    clean = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    edited = {}
    for dtype in (torch.float32, torch.bfloat16):
        models = build_random("tiny", dtype=dtype)
        schedule = models.config.schedule
        timesteps = schedule.timesteps(3).tolist()
        with torch.no_grad():
            emb = models.text_encoder(models.tokenizer(["", "", "a wolf"]))
        prompts = PromptEmbeddings(emb[0:1], emb[1:2], emb[2:3])
        source = {t: clean + 0.1 * i for i, t in enumerate(timesteps)}  # float32, as invert_frames returns them
        start, _ = edit_start(settings, schedule, timesteps, source, clean.to(dtype))
        assert start.dtype == torch.float32  # whatever dtype the clean latents came in
        edited[dtype], _ = edit_video_latents(models.unet, schedule, settings, prompts, source, clean, timesteps)
        assert edited[dtype].dtype == torch.float32
    assert _rmse(edited[torch.bfloat16], edited[torch.float32]) < 0.05 * edited[torch.float32].std().item()


def test_vae_stages_take_float32_latents_with_a_reduced_precision_vae():
    models = build_random("tiny", dtype=torch.bfloat16)
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    clean = encode_frames(models.vae, images, batch_size=2)
    assert clean.dtype == torch.float32 and clean.shape == (3, 4, 8, 8)
    decoded = decode_latents(models.vae, clean, batch_size=2)
    assert decoded.dtype == torch.float32 and decoded.shape == (3, 3, 64, 64)


# ----------------------------------------------------------------------------- 8. host copies


def test_inversion_copies_each_batch_to_the_host_once_and_caches_from_that_copy(monkeypatch, tmp_path):
    """Before: one copy per kept timestep per batch, then one per frame and timestep for the cache
    (here 3 + 3 x 3 per batch of 3 frames). Now: one [T, b, 4, h, w] copy per batch."""
    models = build_random("tiny")
    schedule = models.config.schedule
    keep = schedule.timesteps(3).tolist()
    clean = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    prompt = torch.zeros(1, 77, models.unet.config.cross_attention_dim)
    cache = InversionCache(tmp_path, "k")
    copies = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        copies.append(tuple(self.shape))
        return real_cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    with torch.no_grad():
        out = invert_frames(models.unet, schedule, clean, prompt, inversion_steps=3, keep_timesteps=keep,
                            batch_size=3, cache=cache)
    monkeypatch.undo()
    assert copies == [(3, 3, 4, 8, 8), (3, 2, 4, 8, 8)]  # batches of 3 and 2 frames
    for i in range(5):  # the cached frames are the returned latents
        for t, x in cache.load(i).items():
            assert torch.equal(x, out[t][i])
    with torch.no_grad():
        plain = invert_frames(models.unet, schedule, clean, prompt, inversion_steps=3, keep_timesteps=keep, batch_size=3)
    assert all(torch.equal(plain[t], out[t]) for t in keep)


# ----------------------------------------------------------------------------- 7. CLIP in Table 1


def test_table1_loads_clip_after_every_run_and_frees_it(monkeypatch, tmp_path, capsys):
    """CLIP (1.7 GB on the runs' device) is loaded once, after the last run, and dropped after scoring."""
    import tools.clip_score
    from tools import table1

    events, scorers = [], []
    real_run_one = table1.run_one

    def run_one(cfg, run_dir, **kwargs):
        events.append("run")
        return real_run_one(cfg, run_dir, **kwargs)

    class Score:
        mean = 0.25

    class Scorer(table1.ClipScorer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            scorers.append(self)

    monkeypatch.setattr(table1, "run_one", run_one)
    monkeypatch.setattr(table1, "ClipScorer", Scorer)
    monkeypatch.setattr(tools.clip_score, "load_clip", lambda model, device: events.append(f"load {model} on {device}") or "clip")
    monkeypatch.setattr(tools.clip_score, "clip_score_or_none",
                        lambda frames, prompt, model: events.append(f"score with {model}") or Score())
    clip = make_sample_clip(tmp_path / "a.mp4", frames=3, size=64)
    code = table1.main(["--pairs", f"{clip}::a watercolor painting", "--out-dir", str(tmp_path / "t"), "--in-process",
                        "--methods", "reconstruction,per_frame", "--clip-model", "some/clip", "--model", "tiny",
                        "--size", "64", "--steps", "2", "inversion.steps=4", "device=cpu",
                        f"inversion.cache_dir={tmp_path / 'cache'}"])
    assert code == 0, capsys.readouterr()
    assert events == ["run", "run", "load some/clip on cpu", "score with clip", "score with clip"]
    assert len(scorers) == 1 and scorers[0].loaded is None  # freed once the scores are in
    assert "| 0.2500 |" in (tmp_path / "t" / "table1.md").read_text()
