"""One video across several processes: `torchrun --nproc_per_node=K` starting the same `tokenflow` CLI.

    torchrun --nproc_per_node=4 -m tokenflow.cli video=long.mp4 prompt="..."   # 4 GPUs: rank r on cuda:r
    torchrun --nproc_per_node=2 -m tokenflow.cli video=clip.mp4 model=tiny device=cpu  # gloo, on the CPU

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; `Ranks.from_env` joins the
process group (NCCL on GPUs, gloo on the CPU). Rank r takes a contiguous share of the frames
(`FrameShard`) and does everything per frame only for its share:

- encoding and DDIM inversion (the inversion cache is keyed by the whole selection and filled frame by
  frame, so a later run, on any number of ranks, reuses it);
- at every denoising step (Alg. 1), through the loop's seam (`edit.LoopWatch(shard)`): the keyframe pass
  needs the keyframes' current latents x_t and the original video's x_t, which live on the ranks
  owning those frames. `FrameShard.share_keyframes` sends them to
  every rank (one all-reduce of a [K, 2, 4, h, w] float32 buffer, each keyframe's row filled by its
  owner, zeros elsewhere, so the sum is the owner's value exactly). Every rank then runs the joint
  keyframe pass itself: it is 1/keyframe_interval of the frames, and recomputing it costs less than
  sending its recorded tokens (every self-attention layer's T_base, hundreds of times the latents).
  The propagation pass and the DDIM step then run for the rank's own frames only;
- decoding; the decoded frames are gathered to rank 0, which writes the outputs and run.json (with
  each rank's frames and timings in `ranks`).

Per step a rank sends and receives O(K x 4 x h x w) numbers: 2 x 64 KiB per keyframe at 512x512, so
640 KiB for the 40-frame clip's 5 keyframes and 16 MiB for a 1,000-frame clip's 125, against
1,000/K_ranks frames' worth of UNet forwards. Nothing scales with the number of frames per step.

The keyframe draw of each step is a pure function of (seed, step) (edit.keyframes_at), so every rank
draws the same keyframes without talking; the result equals the single-process run's up to the
floating-point order of differently sized propagation batches.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # set by torchrun (and by torch.distributed.launch)


def launched_ranks() -> int:
    """The number of processes torchrun started for this run (1 when not started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Ranks:
    """This process's place in a torchrun launch, with the process group joined."""

    rank: int
    world_size: int
    local_rank: int
    comm_device: str  # where collective buffers live: "cpu" (gloo) or this rank's GPU (NCCL)

    @classmethod
    def from_env(cls, device: str) -> Ranks | None:
        """The launch this process belongs to, joined; None when it runs alone. `device`: the
        device this rank computes on (device.pick_device gives cuda:LOCAL_RANK under torchrun)."""
        if launched_ranks() <= 1:
            return None
        import torch.distributed as dist

        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
        cuda = device.startswith("cuda")
        if not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(rank=rank, world_size=world, local_rank=local, comm_device=device if cuda else "cpu")

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> FrameShard:
        if n < self.world_size:
            raise ValueError(f"{n} frames cannot be shared by {self.world_size} ranks: start at most {n} (torchrun --nproc_per_node)")
        return FrameShard(self, n)

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        """[rank 0's obj, rank 1's, ...] on every rank (small objects: run facts, timings)."""
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sum(self, counts: tuple[int, ...]) -> tuple[int, ...]:
        """Each count summed over the ranks, on every rank (forwards counted per rank)."""
        return tuple(sum(values) for values in zip(*self.all_gather(tuple(counts))))

    def check_mode(self, mode: str) -> None:
        if mode == "extended_all":
            raise ValueError("tokenflow.mode=extended_all attends every frame to every frame at every layer: it cannot be "
                             "shared by frames across ranks; run it in one process (without torchrun)")

    def close(self) -> None:
        """Leave the process group (after the last exchange; no barrier, so a failed rank does not hang the rest)."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class FrameShard:
    """The frames one rank computes, and the two exchanges a sharded run needs (keyframes per step,
    decoded frames at the end). Frame numbers are positions in the whole selection (0..n-1)."""

    def __init__(self, ranks: Ranks, n: int):
        self.ranks, self.n = ranks, n
        bounds = [r * n // ranks.world_size for r in range(ranks.world_size + 1)]  # contiguous, sizes differ by <= 1
        self.starts = bounds[:-1]
        self.frames = list(range(bounds[ranks.rank], bounds[ranks.rank + 1]))
        self.counts = [b - a for a, b in zip(bounds[:-1], bounds[1:])]

    def owner(self, i: int) -> int:
        return max(r for r, s in enumerate(self.starts) if s <= i)

    # ------------------------------------------------------------------ tensors of the whole clip

    def full(self, local: Tensor) -> Tensor:
        """This rank's rows [len(frames), ...] placed in a clip-sized tensor [n, ...] (zeros elsewhere:
        never read except keyframe rows, which `share_keyframes` fills)."""
        out = local.new_zeros((self.n, *local.shape[1:]))
        out[self.frames[0]: self.frames[-1] + 1] = local
        return out

    def full_source(self, local: dict[int, Tensor]) -> FullSource:
        return FullSource(self, local)

    def own_rows(self, whole: Tensor) -> Tensor:
        """[n, ...] -> this rank's rows [len(frames), ...]."""
        return whole[self.frames[0]: self.frames[-1] + 1]

    def cache_view(self, cache) -> ShardCache:
        """The inversion cache as this rank's share sees it, once rank 0 has cleared it (inversion.force)."""
        import torch.distributed as dist

        dist.barrier()
        return ShardCache(cache, self.frames)

    # ------------------------------------------------------------------ exchanges

    def share_keyframes(self, latents: Tensor, source: Tensor, keyframes: list[int]) -> None:
        """Fill the keyframe rows of `latents` and `source` ([n, 4, h, w] each) on every rank with
        their owners' values: one all-reduce of [K, 2, 4, h, w] (float32: exact for any model dtype)."""
        import torch.distributed as dist

        mine = [j for j, k in enumerate(keyframes) if self.owner(k) == self.ranks.rank]
        buf = torch.zeros((len(keyframes), 2, *latents.shape[1:]), dtype=torch.float32, device=self.ranks.comm_device)
        if mine:
            rows = [keyframes[j] for j in mine]
            buf[mine, 0] = latents[rows].to(buf)
            buf[mine, 1] = source[rows].to(buf)
        dist.all_reduce(buf)
        latents[keyframes] = buf[:, 0].to(latents)
        source[keyframes] = buf[:, 1].to(source)

    def gather_to_root(self, local: Tensor) -> Tensor | None:
        """Every rank's rows [len(frames), ...] -> the whole clip [n, ...] on rank 0 (None elsewhere),
        on the CPU. Shares differ in size by one frame at most: each is padded to the largest."""
        import torch.distributed as dist

        size = max(self.counts)
        buf = local.new_zeros((size, *local.shape[1:]), device=self.ranks.comm_device)
        buf[: local.shape[0]] = local.to(buf.device)
        parts = [torch.empty_like(buf) for _ in range(self.ranks.world_size)] if self.ranks.is_root else None
        dist.gather(buf, parts, dst=0)
        if not self.ranks.is_root:
            return None
        return torch.cat([p[:c] for p, c in zip(parts, self.counts)]).cpu()


class FullSource(dict):
    """{t: [n, 4, h, w]} of the original video as the edit loop reads it, built per timestep from this
    rank's rows (kept at [len(frames), ...]: steps x n latents never sit on one rank)."""

    def __init__(self, shard: FrameShard, local: dict[int, Tensor]):
        super().__init__(local)
        self.shard = shard

    def __getitem__(self, t: int) -> Tensor:
        return self.shard.full(super().__getitem__(t))


def rank_facts(ranks: Ranks, shard: FrameShard, device: str, timings: dict, reused: int, peak: dict) -> list[dict]:
    """Each rank's share and timings, gathered to every rank (rank 0 writes them into run.json)."""
    mine = {"rank": ranks.rank, "host": socket.gethostname(), "device": device, "frames": len(shard.frames),
            "first_frame": shard.frames[0], "last_frame": shard.frames[-1], "timings_s": dict(timings),
            "inversion_frames_reused": reused, "peak_memory_mb": peak, "finished": time.time()}
    return ranks.all_gather(mine)


def remove_own_run_dir(ranks: Ranks, own: Path, root: Path) -> None:
    """A rank other than 0 whose run dir (made by its own Hydra, named by its own clock) is not rank
    0's: remove it while it is empty, so a launch leaves one run folder."""
    if ranks.is_root or own.resolve() == root.resolve() or not own.is_dir():
        return
    if not any(own.iterdir()):
        own.rmdir()


class ShardCache:
    """The inversion cache as one rank's `invert_frames` sees it: frames numbered 0..len(frames)-1
    (positions in the rank's share), stored under their numbers in the whole selection, so the
    cache key and files are the same as a single-process run's."""

    def __init__(self, cache, frames: list[int]):
        self.cache, self.frames = cache, frames
        self.dir = cache.dir

    def _out(self, frames: list[int], result: list[int]) -> list[int]:
        back = {self.frames[i]: i for i in frames}
        return [back[g] for g in result]

    def missing(self, frames: list[int]) -> list[int]:
        return self._out(frames, self.cache.missing([self.frames[i] for i in frames]))

    def claim(self, frames: list[int]) -> list[int]:
        return self._out(frames, self.cache.claim([self.frames[i] for i in frames]))

    def wait(self, frames: list[int]) -> list[int]:
        return self._out(frames, self.cache.wait([self.frames[i] for i in frames]))

    def release(self, frames: list[int]) -> None:
        self.cache.release([self.frames[i] for i in frames])

    def refresh(self, frames: list[int]) -> None:
        self.cache.refresh([self.frames[i] for i in frames])

    def has(self, i: int) -> bool:
        return self.cache.has(self.frames[i])

    def save(self, i: int, latents: dict, noise_maps: dict | None = None) -> Path:
        return self.cache.save(self.frames[i], latents, noise_maps=noise_maps)

    def load(self, i: int, **kw) -> dict:
        return self.cache.load(self.frames[i], **kw)

    def load_noise_maps(self, i: int, **kw) -> dict:
        return self.cache.load_noise_maps(self.frames[i], **kw)
