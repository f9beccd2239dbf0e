"""Benchmarks: our hand-written UNet, VAE and text encoder against diffusers/transformers, and the
end-to-end seconds per frame of an edit with the tiny model.

    python -m tools.maintainers.bench --parts unet --model sd21_base --repeats 3 --threads 2
    python -m tools.maintainers.bench --parts vae --latent 32           # VAE decode of 32x32 latents, encode of 256x256 images
    python -m tools.maintainers.bench --parts controlnet --model sd15   # our ControlNet against diffusers' ControlNetModel
    python -m tools.maintainers.bench --parts none --e2e --e2e-controlnet   # the tiny edit with and without ControlNet (canny)
    python -m tools.maintainers.bench --parts unet,vae,text --dtype float32,bfloat16 --markdown bench.md
    python -m tools.maintainers.bench --parts none --e2e                # only the end-to-end timing (tiny model)
    python -m tools.maintainers.bench --model tiny --parts text --repeats 1 --no-memory   # seconds, no weights, at the test sizes

What is compared, and how (so a ratio means "same work, different code"):
- The reference is built at the IDENTICAL config (diffusers UNet2DConditionModel with SD-2.1's blocks,
  AutoencoderKL, transformers CLIPTextModel with 23 layers; checked by reading our config back from
  the reference's), with seeded random weights (norm and bias vectors moved off their defaults so
  every tensor matters). Our model is built on the meta device and assigned the reference's tensors
  by name (vae/keys.py and clip_text/keys.py normalise the names): the two share one copy of the
  weights, in the same dtype, on the same device, in one process, with the same thread count.
- Rows: `unet` (one forward: latents [B, 4, L, L], t = 981, text context [B, 77, 1024]);
  `vae.encode` (images [B, 3, 8L, 8L] -> posterior mean and log-variance) and `vae.decode`
  (latents [B, 4, L, L] -> images), timed separately because a 512x512 encode+decode is heavy on a
  CPU (pass --latent 32 for 256x256 images); `text` (token ids [B, 77] -> [B, 77, 1024]);
  `controlnet` (one forward of a ControlNet for the preset's UNet against diffusers' ControlNetModel at
  the same config: latents [B, 4, L, L], t, text context, condition image [B, 3, 8L, 8L] -> the 12 skip
  residuals and the mid one).
- Time: `warmup` untimed forwards of each, then `repeats` timed forwards alternating ours and the
  reference (and which goes first), under torch.inference_mode, each timed by tokenflow.measure's
  Stopwatch (which waits for the GPU's queued work before and after). Reported: the median seconds of each and ours/reference of the medians (< 1: ours is
  faster). On a shared machine other processes add noise: repeat and look at both medians.
- Peak memory (tokenflow.measure's PeakMemory.increase): on a GPU, torch.cuda.max_memory_allocated()
  minus the memory allocated before the forward (after reset_peak_memory_stats). On a CPU, tracemalloc cannot see torch's allocations and
  RSS in a process that already ran a forward stays high (freed blocks stay in malloc's arenas), so
  each side is measured in a FRESH subprocess with glibc told to return freed memory
  (MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0): build, one warm-up forward, then the
  kernel's high-water mark of RSS (VmHWM, reset through /proc/self/clear_refs) minus RSS before the
  measured forward (n/a where the peak cannot be reset). Weights are excluded; what is left is the forward's activations and workspace.
- Agreement: the max abs difference of the last timed outputs (in float32), next to the reference
  output's max abs value for scale. A large difference means the timing does not compare like with like.

diffusers and transformers are imported only inside this tool (they are the test extras; the product
never imports them).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from clip_text.keys import IGNORED_KEYS as TEXT_IGNORED
from clip_text.keys import normalise_transformers_keys
from clip_text.model import TextConfig, TextEncoder
from tokenflow.measure import PeakMemory, Stopwatch
from tokenflow.models.checkpoint import assign_strict
from tokenflow.models.presets import PRESETS
from unet.model import UNet, UNetConfig
from vae.keys import normalise_diffusers_keys
from vae.model import VAE, VAEConfig

REPO = Path(__file__).resolve().parents[2]
MODELS = ("unet", "vae", "text", "controlnet")
CONFIGS = tuple(PRESETS)  # --model NAME: the configs benchmarked are the preset's (tokenflow.models.presets)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TIMESTEP = 981  # the first of SD's 50 sampling steps; any value costs the same
INSTALL_HINT = "pip install 'diffusers>=0.30' 'transformers>=4.40'  (or: pip install -e '.[test]')"
# glibc: every block >= 64 KiB gets its own mapping and is unmapped when freed, and the heap top is
# trimmed at once, so RSS follows live memory instead of keeping a previous forward's blocks.
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def require(name: str):
    """Import a reference library, or stop with what to install."""
    try:
        lib = __import__(name)
    except ImportError as e:
        raise SystemExit(f"tools.maintainers.bench: the reference implementations need {name} ({e}). Install with: {INSTALL_HINT}") from None
    lib.utils.logging.set_verbosity_error()  # e.g. diffusers' advice on .to(dtype), which is what we mean
    return lib


# ----------------------------------------------------------------------------- model pairs


@dataclass
class Pair:
    """Our model and the reference at the same config, sharing one copy of the weights."""

    ours: nn.Module
    reference: nn.Module
    config: Any  # our config dataclass


def _randomise(ref: nn.Module, seed: int) -> nn.Module:
    """Move norm weights/biases and biases off their init (ones/zeros) so every tensor matters.
    Only 1-d parameters: noise on the big matrices would change the activations' scale at full size."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return ref


def _finish(ref: nn.Module, ours_cls, cfg, state_of: Callable[[nn.Module], dict], dtype, device, seed,
            source: str, ignore=()) -> Pair:
    ref = _randomise(ref, seed).to(device=device, dtype=dtype).eval().requires_grad_(False)
    with torch.device("meta"):
        ours = ours_cls(cfg)
    assign_strict(ours, state_of(ref), source=source, ignore=ignore)
    return Pair(ours.eval(), ref, cfg)


def _check_same_config(ours_cfg, read_back, what: str) -> None:
    if read_back != ours_cfg:
        raise RuntimeError(f"tools.maintainers.bench: the {what} reference's config reads back as {read_back}, not {ours_cfg}")


def unet_pair(config: str, dtype: torch.dtype, device: str, seed: int = 0) -> Pair:
    diffusers = require("diffusers")
    cfg = PRESETS[config].unet()
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(
        sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)),
        attention_head_dim=list(cfg.heads),  # diffusers' historical name for the head COUNT
        cross_attention_dim=cfg.cross_attention_dim, use_linear_projection=cfg.use_linear_projection,
        norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps, upcast_attention=cfg.upcast_attention,
    )
    _check_same_config(cfg, UNetConfig.from_diffusers_config(dict(ref.config)), "UNet")
    return _finish(ref, UNet, cfg, lambda r: dict(r.state_dict()), dtype, device, seed, "diffusers UNet2DConditionModel")


def vae_pair(config: str, dtype: torch.dtype, device: str, seed: int = 0) -> Pair:
    diffusers = require("diffusers")
    cfg = PRESETS[config].vae()
    n = len(cfg.block_out_channels)
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        norm_num_groups=cfg.norm_num_groups, scaling_factor=cfg.scaling_factor, sample_size=512,
    )
    _check_same_config(cfg, VAEConfig.from_diffusers_config(dict(ref.config)), "VAE")
    return _finish(ref, VAE, cfg, lambda r: normalise_diffusers_keys(r.state_dict()), dtype, device, seed,
                   "diffusers AutoencoderKL")


def text_pair(config: str, dtype: torch.dtype, device: str, seed: int = 0) -> Pair:
    transformers = require("transformers")
    cfg = PRESETS[config].text()
    torch.manual_seed(seed)
    ref_cfg = transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_positions, hidden_size=cfg.width,
        num_attention_heads=cfg.heads, num_hidden_layers=cfg.layers, intermediate_size=cfg.mlp,
        hidden_act=cfg.act, layer_norm_eps=cfg.layer_norm_eps,
    )
    ref_cfg._attn_implementation = "sdpa"  # the same attention kernel as ours
    ref = transformers.CLIPTextModel(ref_cfg)
    _check_same_config(cfg, TextConfig.from_transformers_config(ref.config.to_dict()), "text encoder")
    return _finish(ref, TextEncoder, cfg, lambda r: normalise_transformers_keys(r.state_dict()), dtype, device, seed,
                   "transformers CLIPTextModel", ignore=TEXT_IGNORED)


def controlnet_pair(config: str, dtype: torch.dtype, device: str, seed: int = 0) -> Pair:
    from unet.controlnet import ControlNet, config_from_diffusers

    diffusers = require("diffusers")
    cfg = PRESETS[config].unet()
    torch.manual_seed(seed)
    ref = diffusers.ControlNetModel(
        in_channels=cfg.in_channels, block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels),
        attention_head_dim=list(cfg.heads), cross_attention_dim=cfg.cross_attention_dim,
        use_linear_projection=cfg.use_linear_projection, norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps,
        upcast_attention=cfg.upcast_attention, conditioning_channels=3,
    )
    read_back = config_from_diffusers(dict(ref.config))[0]
    _check_same_config(cfg, dataclasses.replace(read_back, sample_size=cfg.sample_size, out_channels=cfg.out_channels),
                       "ControlNet")
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():  # the zero convolutions drawn (trained ones are not zero), so the residuals compare real work
        for conv in [*ref.controlnet_down_blocks, ref.controlnet_mid_block, ref.controlnet_cond_embedding.conv_out]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.02)
    return _finish(ref, ControlNet, cfg, lambda r: dict(r.state_dict()), dtype, device, seed, "diffusers ControlNetModel")


PAIRS = {"unet": unet_pair, "vae": vae_pair, "text": text_pair, "controlnet": controlnet_pair}


# ----------------------------------------------------------------------------- cases: one forward each


@dataclass
class Case:
    """One row of the table: the same inputs through ours and through the reference."""

    name: str
    inputs: str
    ours: Callable[[], Any]
    reference: Callable[[], Any]


def _shape(t: Tensor) -> str:
    return "[" + ",".join(map(str, t.shape)) + "]"


def make_cases(model: str, pair: Pair, batch: int, latent: int, dtype: torch.dtype, device: str, seed: int = 0) -> list[Case]:
    g = torch.Generator().manual_seed(seed + 2)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    ours, ref, cfg = pair.ours, pair.reference, pair.config
    if model == "unet":
        x, ctx = randn(batch, cfg.in_channels, latent, latent), randn(batch, 77, cfg.cross_attention_dim)
        t = torch.full((batch,), TIMESTEP, device=device)
        return [Case("unet", f"x {_shape(x)} ctx {_shape(ctx)}", lambda: ours(x, t, ctx),
                     lambda: ref(x, t, encoder_hidden_states=ctx, return_dict=False)[0])]
    if model == "vae":
        f = ours.downsample_factor
        images = (torch.rand(batch, cfg.in_channels, latent * f, latent * f, generator=g) * 2 - 1).to(device=device, dtype=dtype)
        z = randn(batch, cfg.latent_channels, latent, latent)

        def ref_encode():
            posterior = ref.encode(images).latent_dist
            return posterior.mean, posterior.logvar

        return [
            Case("vae.encode", f"images {_shape(images)}", lambda: ours.encode(images), ref_encode),
            Case("vae.decode", f"latents {_shape(z)}", lambda: ours.decode(z),
                 lambda: ref.decode(z, return_dict=False)[0]),
        ]
    if model == "text":
        # rows like the tokenizer's: start token, random BPE ids, end token, zero padding
        ids = torch.zeros(batch, cfg.max_positions, dtype=torch.long)
        for i in range(batch):
            n = int(torch.randint(1, cfg.max_positions - 1, (1,), generator=g))
            ids[i, 0], ids[i, n + 1] = 49406 % cfg.vocab_size, 49407 % cfg.vocab_size
            ids[i, 1 : n + 1] = torch.randint(0, min(cfg.vocab_size, 49406), (n,), generator=g)
        ids = ids.to(device)
        return [Case("text", f"ids {_shape(ids)}", lambda: ours(ids), lambda: ref(input_ids=ids).last_hidden_state)]
    if model == "controlnet":
        x, ctx = randn(batch, cfg.in_channels, latent, latent), randn(batch, 77, cfg.cross_attention_dim)
        cond = (torch.rand(batch, 3, 8 * latent, 8 * latent, generator=g) > 0.8).to(device=device, dtype=dtype)
        t = torch.full((batch,), TIMESTEP, device=device)

        def ours_residuals():
            r = ours(x, t, ctx, cond, 1.0)
            return [*r.down, r.mid]

        def ref_residuals():
            down, mid = ref(x, t, encoder_hidden_states=ctx, controlnet_cond=cond, return_dict=False)
            return [*down, mid]

        return [Case("controlnet", f"x {_shape(x)} ctx {_shape(ctx)} cond {_shape(cond)}", ours_residuals, ref_residuals)]
    raise ValueError(f"tools.maintainers.bench: unknown model {model!r}; choose from {', '.join(MODELS)}")


# ----------------------------------------------------------------------------- measuring


def _tensors(out) -> list[Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def max_abs_diff(a, b) -> float:
    pairs = list(zip(_tensors(a), _tensors(b), strict=True))
    for x, y in pairs:
        if x.shape != y.shape:
            raise RuntimeError(f"tools.maintainers.bench: output shapes differ: ours {tuple(x.shape)} vs reference {tuple(y.shape)}")
    return max(float((x.float() - y.float()).abs().max()) for x, y in pairs)


@dataclass
class Timing:
    ours_s: list[float]
    reference_s: list[float]
    max_abs_diff: float
    reference_abs_max: float


def time_case(case: Case, repeats: int, warmup: int, device: str) -> Timing:
    """Alternate ours and the reference (swapping which goes first) so slow drifts of a shared
    machine's load fall on both."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"tools.maintainers.bench: repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    last: dict[str, Any] = {}
    fns = {"ours": case.ours, "reference": case.reference}
    watch = Stopwatch(device)  # each lap waits for the device's queued work
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for i in range(repeats):
            for side in ("ours", "reference") if i % 2 == 0 else ("reference", "ours"):
                last.pop(side, None)  # the previous output is not held during this forward
                watch.restart()
                last[side] = fns[side]()
                times[side].append(watch.lap(side))
    ref_max = max(float(t.float().abs().max()) for t in _tensors(last["reference"]))
    return Timing(times["ours"], times["reference"], max_abs_diff(last["ours"], last["reference"]), ref_max)


@dataclass
class MemorySpec:
    """Everything a fresh process needs to rebuild one side of one case."""

    model: str
    case: str
    side: str  # ours | reference
    config: str
    dtype: str
    device: str
    batch: int
    latent: int
    threads: int
    seed: int = 0


def _case_of(spec: MemorySpec, pair: Pair) -> Case:
    cases = {c.name: c for c in make_cases(spec.model, pair, spec.batch, spec.latent, DTYPES[spec.dtype], spec.device, spec.seed)}
    return cases[spec.case]


def measure_memory_here(spec: MemorySpec) -> float | None:
    """Peak memory increase (MiB) of one forward of one side, in THIS process (the subprocess on CPU)."""
    torch.set_num_threads(spec.threads)
    pair = PAIRS[spec.model](spec.config, DTYPES[spec.dtype], spec.device, spec.seed)
    # Both sides share one copy of the weights, so either side's baseline is that one copy.
    fn = getattr(_case_of(spec, pair), spec.side)
    with torch.inference_mode():
        fn()  # warm-up: one-time kernel/thread-pool set-up is not the forward's memory
        gc.collect()
        # CUDA books an allocation when the kernel is queued, not when it runs: no sync is needed
        memory = PeakMemory(spec.device)
        fn()
    # None where the RSS peak cannot be reset (no /proc/self/clear_refs): the table says n/a
    return memory.increase()["cuda_allocated" if spec.device.startswith("cuda") else "cpu_rss"]


def measure_memory(spec: MemorySpec) -> float | None:
    """Run `measure_memory_here` in a fresh Python (its allocator has seen nothing else)."""
    env = {**os.environ, **MEASURE_ENV, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "tools.maintainers.bench", "--memory-child", json.dumps(asdict(spec))],
        capture_output=True, text=True, env=env, cwd=str(REPO),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"tools.maintainers.bench: memory measurement of {spec.case} ({spec.side}) failed:\n{proc.stderr[-3000:]}")
    peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_increase_mib"]
    return None if peak is None else float(peak)


# ----------------------------------------------------------------------------- one model -> rows


@dataclass
class Row:
    model: str
    config: str
    device: str
    dtype: str
    batch: int
    inputs: str
    ours_s: float  # median
    reference_s: float  # median
    time_ratio: float  # ours / reference (< 1: ours faster)
    ours_peak_mib: float | None
    reference_peak_mib: float | None
    memory_ratio: float | None  # ours / reference
    max_abs_diff: float
    reference_abs_max: float
    ours_runs_s: list[float]
    reference_runs_s: list[float]


def bench_model(model: str, config: str = "sd21_base", dtype: str = "float32", device: str = "cpu", batch: int = 1,
                latent: int = 64, repeats: int = 3, warmup: int = 1, memory: bool = True, seed: int = 0) -> list[Row]:
    """Rows for one model (the VAE gives two: encode and decode) at one dtype."""
    if model not in PAIRS:
        raise ValueError(f"tools.maintainers.bench: unknown model {model!r}; choose from {', '.join(MODELS)}")
    if config not in CONFIGS:
        raise ValueError(f"tools.maintainers.bench: unknown config {config!r}; choose from {', '.join(CONFIGS)}")
    if dtype not in DTYPES:
        raise ValueError(f"tools.maintainers.bench: unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if batch < 1 or latent < 1:
        raise ValueError(f"tools.maintainers.bench: batch and latent must be >= 1, got {batch} and {latent}")
    threads = torch.get_num_threads()

    # Memory first, in fresh processes, before this process holds a copy of the weights.
    names = {"unet": ["unet"], "vae": ["vae.encode", "vae.decode"], "text": ["text"], "controlnet": ["controlnet"]}[model]
    peaks: dict[tuple[str, str], float] = {}
    if memory:
        for name in names:
            for side in ("ours", "reference"):
                spec = MemorySpec(model, name, side, config, dtype, device, batch, latent, threads, seed)
                peaks[name, side] = measure_memory(spec) if device == "cpu" else measure_memory_here(spec)

    pair = PAIRS[model](config, DTYPES[dtype], device, seed)
    rows = []
    for case in make_cases(model, pair, batch, latent, DTYPES[dtype], device, seed):
        timing = time_case(case, repeats, warmup, device)
        ours_s, ref_s = statistics.median(timing.ours_s), statistics.median(timing.reference_s)
        ours_mem, ref_mem = peaks.get((case.name, "ours")), peaks.get((case.name, "reference"))
        rows.append(Row(
            model=case.name, config=config, device=device, dtype=dtype, batch=batch, inputs=case.inputs,
            ours_s=ours_s, reference_s=ref_s, time_ratio=ours_s / ref_s,
            ours_peak_mib=ours_mem, reference_peak_mib=ref_mem,
            memory_ratio=ours_mem / ref_mem if ours_mem is not None and ref_mem else None,
            max_abs_diff=timing.max_abs_diff, reference_abs_max=timing.reference_abs_max,
            ours_runs_s=timing.ours_s, reference_runs_s=timing.reference_s,
        ))
    del pair
    gc.collect()
    return rows


# ----------------------------------------------------------------------------- end to end


def run_e2e(frames: int = 16, size: int = 128, device: str = "cpu", dtype: str = "float32",
            extra_overrides: tuple[str, ...] = ()) -> dict:
    """One tiny-model edit (model=tiny: its step counts) of the generated sample clip via
    tokenflow.pipeline.run_edit, with the inversion cache off so inversion is really computed.
    Returns the stage timings the pipeline wrote to run.json."""
    from tokenflow.config import load_config
    from tokenflow.media.sample_clip import make_sample_clip
    from tokenflow.pipeline import run_edit

    with tempfile.TemporaryDirectory(prefix="tokenflow-bench-") as tmp:
        clip = make_sample_clip(Path(tmp) / "clip.mp4", frames=frames, size=size)
        overrides = ["model=tiny", f"video={clip}", f"size={size}", "progress=false", "inversion.cache=false",
                     f"device={device}", f"dtype={dtype}", "output.side_by_side=false", *extra_overrides]
        cfg = load_config(overrides)
        run_edit(cfg, Path(tmp) / "run")
        run = json.loads((Path(tmp) / "run" / "run.json").read_text())
    return {
        "frames": run["frames"], "size": run["size"], "steps": cfg.steps, "inversion_steps": cfg.inversion.steps,
        "device": run["device"], "dtype": run["dtype"], "timings_s": run["timings_s"],
        "seconds_per_frame": run["seconds_per_frame"], "peak_memory_mb": run["peak_memory_mb"],
        "unet_frame_forwards": run["unet_frame_forwards"], "controlnet_frame_forwards": run["controlnet_frame_forwards"],
        "controlnet": run["controlnet"],
    }


# ----------------------------------------------------------------------------- reporting


def describe_machine(device: str) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
        "load_average_1m_before": round(os.getloadavg()[0], 2),
    }
    for lib in ("diffusers", "transformers"):
        try:
            info[lib] = __import__(lib).__version__
        except ImportError:
            info[lib] = "missing"
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def markdown_report(machine: dict, rows: list[Row], e2e: dict | None = None) -> str:
    lines = ["## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    if rows:
        lines += ["", "## Ours vs reference (median seconds per forward; ratios ours/reference)", "",
                  "| model | config | device | dtype | batch | inputs | ours s | reference s | time ratio "
                  "| ours peak MiB | reference peak MiB | memory ratio | max abs diff (ref max) |",
                  "|" + "---|" * 13]
        for r in rows:
            lines.append(
                f"| {r.model} | {r.config} | {r.device} | {r.dtype} | {r.batch} | {r.inputs} | {r.ours_s:.4f} "
                f"| {r.reference_s:.4f} | {r.time_ratio:.3f} | {_num(r.ours_peak_mib, '.2f')} "
                f"| {_num(r.reference_peak_mib, '.2f')} | {_num(r.memory_ratio, '.3f')} "
                f"| {r.max_abs_diff:.2e} ({r.reference_abs_max:.3g}) |"
            )
    if e2e is not None:
        h, w = e2e["size"]
        lines += ["", f"## End to end (tiny model, {e2e['frames']} frames at {h}x{w}, {e2e['steps']} steps, "
                      f"{e2e['inversion_steps']} inversion steps, {e2e['device']} {e2e['dtype']}"
                      + (f", ControlNet {e2e['controlnet']['condition']}: {e2e['controlnet_frame_forwards']} ControlNet "
                         f"frame-forwards beside {e2e['unet_frame_forwards']} UNet ones" if e2e.get("controlnet") else "")
                      + ")", "",
                  "| stage | seconds | seconds per frame |", "|---|---|---|"]
        for stage, seconds in e2e["timings_s"].items():
            per = e2e["seconds_per_frame"].get(stage)
            lines.append(f"| {stage} | {seconds:.3f} | {_num(per, '.4f')} |")
        lines.append(f"| total | {sum(e2e['timings_s'].values()):.3f} | "
                     f"{sum(e2e['timings_s'].values()) / e2e['frames']:.4f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- command line


def _list(text: str, allowed, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.maintainers.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--parts", default="unet,vae,text",
                   help="comma list of unet, vae, text, controlnet; 'none' for only --e2e (default: unet, vae, text)")
    p.add_argument("--model", choices=CONFIGS, default="sd21_base",
                   help="whose sizes: any preset of tokenflow.models.presets (default sd21_base; random weights either way)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", help="comma list of float32, float16, bfloat16 (one set of rows each)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--latent", type=int, default=64, help="latent side L: UNet and VAE decode [B,4,L,L], VAE encode [B,3,8L,8L]")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards of each implementation (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards of each first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements (they re-run each forward)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", type=Path, default=None, help="also write the report to this file")
    p.add_argument("--json", type=Path, default=None, help="also write all numbers (every run's seconds) as JSON")
    p.add_argument("--e2e", action="store_true", help="also time a tiny-model edit of the sample clip (seconds per frame)")
    p.add_argument("--e2e-frames", type=int, default=16)
    p.add_argument("--e2e-size", type=int, default=128)
    p.add_argument("--e2e-controlnet", action="store_true", help="the end-to-end edit with controlnet=canny (a random tiny ControlNet)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # internal: one fresh-process measurement
    args = p.parse_args(argv)

    if args.memory_child is not None:
        spec = MemorySpec(**json.loads(args.memory_child))
        print(json.dumps({"peak_increase_mib": measure_memory_here(spec)}))
        return 0

    try:
        models = [] if args.parts.strip() == "none" else _list(args.parts, MODELS, "part")
        dtypes = _list(args.dtype, DTYPES, "dtype")
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        p.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if {"unet", "vae"} & set(models):
        require("diffusers")
    if "text" in models:
        require("transformers")
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    machine = describe_machine(args.device)
    rows: list[Row] = []
    for model in models:
        for dtype in dtypes:
            print(f"[bench] {model} {args.model} {dtype} on {args.device} ...", file=sys.stderr, flush=True)
            rows += bench_model(model, args.model, dtype, args.device, args.batch, args.latent, args.repeats,
                                args.warmup, memory=not args.no_memory, seed=args.seed)
    e2e = None
    if args.e2e:
        print(f"[bench] end to end: tiny model, {args.e2e_frames} frames ...", file=sys.stderr, flush=True)
        e2e = run_e2e(args.e2e_frames, args.e2e_size, args.device, dtypes[0],
                      ("controlnet=canny",) if args.e2e_controlnet else ())
    # other processes on the machine slow both sides down (and unevenly): say how busy it was
    machine["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    report = markdown_report(machine, rows, e2e)
    print(report)
    if args.markdown:
        args.markdown.write_text(report)
        print(f"[bench] wrote {args.markdown.resolve()}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": [asdict(r) for r in rows], "e2e": e2e}, indent=2))
        print(f"[bench] wrote {args.json.resolve()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
