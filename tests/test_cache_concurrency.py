"""Inversion cache under concurrent runs: two processes inverting the same clip into one cache at
the same time both finish with the same latents, the cache holds each frame once (one whole file,
no temp or claim files left), each frame was computed by exactly one of them, and a third run
reuses every frame; the same for a DDPM inversion (noisy versions and noise maps). Plus the claim rules on their own: exclusive, released, a dead owner's taken over."""

import multiprocessing as mp
import os
import subprocess
import sys

import pytest
import torch

from sampler.ddim import inversion_timesteps
from tokenflow.inversion import ddpm_invert_frames, invert_frames
from tokenflow.inversion_cache import InversionCache
from tokenflow.models import build_random

N_FRAMES, INVERSION_STEPS = 6, 4
FIELDS = dict(
    video_digest="cd" * 32, indices=list(range(N_FRAMES)), size=(64, 64), model_id="tiny",
    inversion_steps=INVERSION_STEPS, keep_timesteps=[], prompt="", extra={"seed": 0},
)


def _inputs():
    models = build_random("tiny", seed=0)
    schedule = models.config.schedule
    keep = schedule.timesteps(3).tolist()
    clean = torch.randn(N_FRAMES, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    prompt = models.text_encoder(models.tokenizer([""]))
    return models.unet, schedule, keep, clean, prompt


DDPM = {"noise_seed": 0, "shared_noise": False, "source_guidance_scale": 1.0, "negative_prompt": None}


def _invert(root, barrier=None, queue=None, method="ddim"):
    """One run: invert the clip into the cache at `root` -> (latents, frame-steps computed, frames
    reused, the cache folder, steps per frame); DDPM's latents hold the noise maps too, under -t."""
    torch.set_num_threads(1)
    unet, schedule, keep, clean, prompt = _inputs()
    ddpm = DDPM if method == "ddpm" else None
    cache = InversionCache.for_run(root, **{**FIELDS, "keep_timesteps": keep}, ddpm=ddpm)
    steps, reused = [0], [0]
    progress = dict(cache=cache, on_progress=lambda k: steps.__setitem__(0, steps[0] + k), on_reuse=lambda k: reused.__setitem__(0, k))
    if barrier is not None:
        barrier.wait()  # both processes start inverting together
    with torch.no_grad():
        if ddpm is None:
            out = invert_frames(unet, schedule, clean, prompt, inversion_steps=INVERSION_STEPS, keep_timesteps=keep,
                                batch_size=1, **progress)
            per_frame = len(inversion_timesteps(schedule, INVERSION_STEPS, keep))
        else:
            xs, zs = ddpm_invert_frames(unet, schedule, clean, prompt, prompt, timesteps=keep, guidance_scale=1.0,
                                        noise_seed=0, shared_noise=False, batch_size=1, **progress)
            out, per_frame = {**xs, **{-t: z for t, z in zs.items()}}, len(keep)
    result = (out, steps[0], reused[0], str(cache.dir), per_frame)
    if queue is not None:  # numpy: torch would pass shared-memory handles that die with this process
        queue.put(({t: x.numpy() for t, x in out.items()}, *result[1:]))
    return result


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_two_processes_invert_one_clip_into_one_cache(tmp_path, method):
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_invert, args=(tmp_path, barrier, queue, method)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    results = [({t: torch.from_numpy(x) for t, x in r[0].items()}, *r[1:]) for r in results]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (a, steps_a, _, folder, grid), (b, steps_b, _, _, _) = results
    # each frame computed once: the two runs' frame-steps add up to one inversion of the clip
    assert steps_a + steps_b == N_FRAMES * grid
    for t in a:
        assert torch.equal(a[t], b[t])
    names = sorted(os.listdir(folder))
    assert names == [f"frame_{i:05d}.safetensors" for i in range(N_FRAMES)] + ["meta.json"]
    # a third run reuses it all and computes nothing; its latents are the same
    c, steps_c, reused_c, _, _ = _invert(tmp_path, method=method)
    assert (steps_c, reused_c) == (0, N_FRAMES)
    for t in a:
        assert torch.equal(a[t], c[t])
    # and they equal an inversion without any cache (DDPM: of the whole clip in one batch; the noise is per frame)
    unet, schedule, keep, clean, prompt = _inputs()
    with torch.no_grad():
        if method == "ddim":
            ref = invert_frames(unet, schedule, clean, prompt, inversion_steps=INVERSION_STEPS, keep_timesteps=keep, batch_size=1)
        else:
            xs, zs = ddpm_invert_frames(unet, schedule, clean, prompt, prompt, timesteps=keep, guidance_scale=1.0,
                                        noise_seed=0, shared_noise=False, batch_size=N_FRAMES)
            ref = {**xs, **{-t: z for t, z in zs.items()}}
    assert sorted(a) == sorted(ref)
    for t in a:  # DDPM's reference ran in one batch of 6: other BLAS shapes, other rounding
        torch.testing.assert_close(a[t], ref[t], rtol=0, atol=1e-6 if method == "ddim" else 1e-4)


def test_claims_are_exclusive_and_released(tmp_path):
    cache = InversionCache.for_run(tmp_path, **{**FIELDS, "keep_timesteps": [1]})
    assert cache.claim([0, 1, 2]) == [0, 1, 2]
    assert cache.claim([0, 1, 2, 3]) == [3]  # this process's own live claims are not handed out twice either
    cache.save(1, {1: torch.zeros(4, 8, 8)})
    cache.release([0, 1, 2, 3])
    assert not any(p.suffix == ".claim" for p in cache.dir.iterdir())
    assert cache.claim([0, 1]) == [0]  # frame 1 has its file: nothing to compute
    cache.release([0])


def test_a_dead_owners_claim_is_taken_over(tmp_path):
    cache = InversionCache.for_run(tmp_path, **{**FIELDS, "keep_timesteps": [1]})
    cache.dir.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    cache.claim_path(4).write_text(f"{socket.gethostname()} {int(dead.stdout)}")  # a run that died mid-frame
    cache.claim_path(5).write_text(f"{socket.gethostname()} {os.getppid()}")  # a live run (our parent)
    assert cache.wait([4], poll_s=0.01) == [4]  # no waiting on the dead: back to be claimed
    assert cache.claim([4, 5]) == [4]
    cache.release([4])
    assert cache.claim_path(5).exists()  # another run's claim is not ours to release
