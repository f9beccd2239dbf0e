"""Device memory of a TokenFlow edit at full size, estimated without a GPU and without weights.

    python -m tools.memory_estimate --frames 40,120,450,1000 --size 512
    python -m tools.memory_estimate --frames 1000 --ff-chunk 1024 --budget-gib 24 --markdown mem.md

Why an estimate: the project aims at 1,000 frames at 512x512 in 24 GB, and the machines it is built
on have no GPU. So the REAL code path, `tokenflow.edit.denoise_step` with the full SD-2.1 UNet,
runs on PyTorch's meta device, where tensors have shapes and dtypes but no data: a 1,000-frame step
takes seconds on a CPU. A dispatch mode (`LiveBytes`) sees every tensor the step creates and keeps
the sum of the bytes of the storages alive at each moment: a storage counts once however many views
share it, and stops counting when Python frees it, exactly when a CUDA allocator would get it back.
The high-water mark of that sum is the step's peak.

Attention is counted as the fused CUDA kernels (flash / memory-efficient SDPA; SD-2.1's head size
64 qualifies in float16 and bfloat16) allocate it: the output and the per-query log-sum-exp. On the
meta device SDPA would take its math path and count a score matrix a GPU never holds. (On a CPU the
score matrix is real: `tokenflow.query_chunk` bounds it there.)

Not counted: the CUDA context and library workspaces (typically 0.5-1 GiB) and the caching
allocator's fragmentation; the budget check leaves `--overhead-gib` (default 1.5) for them.

Rows: one per frame count. Columns: weights (UNet + VAE + text encoder in the dtype), the latents
the loop holds on the device (current, next, the step's x_t of the original video, the clean
latents; float32, the DDIM state), T_base and the original features recorded by the keyframe pass
(kept for the whole propagation pass), and the peaks of the keyframe pass, of the propagation pass,
of one inversion forward and of one VAE encode and one VAE decode batch (`inversion.batch_size`
frames: the pipeline's VAE stages use that batch size), each above what was live before it. The
VAE's full-resolution activations do not depend on the frame count, only on that batch size, so
at short clips they, not the edit, set the peak. The VAE's single 512-wide attention head is counted
as the memory-efficient fused kernel holds it (flash takes heads up to 256 wide only).

`--controlnet`: the edit with a ControlNet of the model's family (tokenflow/controlnet_guide.py): its
weights join `weights`; the control images stay in host memory (not counted), each pass copies its own
frames' to the device, and each pass's peak includes that copy, the ControlNet's forward over the pass's
2F edited images and the residuals it hands the UNet.
"""

from __future__ import annotations

import argparse
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from clip_text.model import TextEncoder
from sampler.schedule import Schedule
from tokenflow.controlnet_guide import ControlNetGuide
from tokenflow.controls import KeyframeTokens
from tokenflow.config import EDIT_MODES as MODES
from tokenflow.edit import EditSettings, LoopWatch, PromptEmbeddings, denoise_step, keyframes_at
from tokenflow.inversion import decode_batch, encode_batch
from tokenflow.models.presets import PRESETS
from unet.model import UNet
from vae.model import VAE

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
GIB = 2**30


# ----------------------------------------------------------------------------- counting live bytes


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the `with` block that are still alive.

    `now`: live bytes; `peak`: their high-water mark; `phase_peaks[name]`: the high-water mark
    while the phase named by the last `start_phase` ran. Storages that existed before the block
    (weights, inputs) are not counted."""

    def __init__(self):
        super().__init__()
        self.alive: dict[int, weakref.ref] = {}
        self.now = self.peak = 0
        self.phase: str | None = None
        self.phase_peaks: dict[str, int] = {}

    def start_phase(self, name: str) -> None:
        self.phase = name
        self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.now)

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)  # one Python object per storage while it lives (PyTorch preserves it)
        if key in self.alive:
            return  # a view of a storage already counted
        size = storage.nbytes()

        def freed(_ref, key=key, size=size):
            self.alive.pop(key, None)
            self.now -= size

        self.alive[key] = weakref.ref(storage, freed)
        self.now += size
        self.peak = max(self.peak, self.now)
        if self.phase is not None:
            self.phase_peaks[self.phase] = max(self.phase_peaks[self.phase], self.now)

    def preexisting(self, tensors) -> None:
        """Mark storages made before counting began (weights, inputs) as not to be counted."""
        for t in tensors:
            self.alive.setdefault(id(t.untyped_storage()), weakref.ref(t.untyped_storage()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._count(t)
        return out


class FusedAttention(TorchFunctionMode):
    """SDPA as a fused CUDA kernel allocates: output [.., Nq, d_v] and log-sum-exp [.., Nq] (float32)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, v = args[0], args[2]
            lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
            out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
            del lse  # freed when the kernel returns
            return out
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------- the estimate


@dataclass
class Estimate:
    frames: int
    keyframes: int
    size: int
    dtype: str
    mode: str
    weights_gib: float
    latents_gib: float  # held on the device through the loop: current, x_t of the original, clean
    recorded_gib: float  # T_base + original features of the keyframes, alive until the step ends
    keyframe_pass_peak_gib: float  # the step's own tensors at their highest (above weights + latents)
    propagation_peak_gib: float  # the same, during the propagation pass (the recorded tokens included)
    inversion_peak_gib: float  # one inversion forward of inversion.batch_size frames
    vae_encode_peak_gib: float  # one VAE encode of inversion.batch_size frames (the images' copy included)
    vae_decode_peak_gib: float  # one VAE decode of inversion.batch_size latents
    total_gib: float  # weights + latents + the highest of the peaks
    vae_batch_size: int = 8  # frames per VAE forward (inversion.batch_size)
    controlnet: bool = False  # with a ControlNet: its weights in weights, its forward in the passes' peaks


# --model NAME: every preset of the registry (tokenflow.models.presets) -> its configs and native short side
MODELS = {name: (p.unet, p.vae, p.text, p.native_size) for name, p in PRESETS.items()}


def _meta_models(dtype: torch.dtype, model: str = "sd21_base"):
    if model not in MODELS:
        raise ValueError(f"memory_estimate: model must be one of {', '.join(MODELS)}, got {model!r}")
    unet_cfg, vae_cfg, text_cfg, _ = MODELS[model]
    with torch.device("meta"):
        unet = UNet(unet_cfg()).to(dtype).requires_grad_(False)
        vae = VAE(vae_cfg()).to(dtype).requires_grad_(False)
        text = TextEncoder(text_cfg()).to(dtype).requires_grad_(False)
    return unet, vae, text


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def estimate(
    frames: int, size: int = 512, dtype: str = "float16", mode: str = "tokenflow", keyframe_interval: int = 8,
    batch_size: int = 8, inversion_batch_size: int = 8, ff_chunk: int | None = 16384, seed: int = 0,
    model: str = "sd21_base", controlnet: bool = False,
) -> Estimate:
    """Peak device memory of one step of the edit (the loop's largest) for `frames` frames of
    size x size pixels; PnP injection on (the first steps', which hold the most); `controlnet`: with a
    ControlNet guiding that step."""
    if frames < 1 or size < 64 or size % 64:
        raise ValueError(f"memory_estimate: frames must be >= 1 and size a multiple of 64, got {frames} and {size}")
    if dtype not in DTYPES:
        raise ValueError(f"memory_estimate: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    unet, vae, text = _meta_models(torch_dtype, model)
    unet.set_feed_forward_chunk(ff_chunk)
    weights = _bytes([p for m in (unet, vae, text) for p in m.parameters()])
    guide = None
    if controlnet:
        from tokenflow.models.controlnet_loading import build_random_controlnet

        net = build_random_controlnet(unet.config, device="meta", dtype=torch_dtype)
        guide = ControlNetGuide(net, torch.empty(frames, 3, size, size, device="meta"), chunk=batch_size)
        weights += _bytes(list(net.parameters()))

    settings = EditSettings(mode=mode, keyframe_interval=keyframe_interval, batch_size=batch_size, seed=seed)
    latent = size // 8

    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=torch_dtype)

    # the DDIM state (current latents, the step's x_t of the original, the clean latents) is float32
    # whatever the model's dtype; only the UNet's input is cast to it
    latents, source, clean = (torch.empty(frames, 4, latent, latent, device="meta") for _ in range(3))
    emb = meta(1, 77, unet.config.cross_attention_dim)
    prompts = PromptEmbeddings(emb, emb, emb)
    schedule = Schedule()
    keyframes = keyframes_at(settings, frames, 0)
    tracker = LiveBytes()
    recorded: list[KeyframeTokens] = []

    class PhaseWatch(LoopWatch):
        # the loop's seam: each pass builds its control here, so we know the phase
        def make_control(self, n, **kwargs):
            if kwargs.get("record") is not None:
                recorded.append(kwargs["record"])
                tracker.start_phase("keyframe pass")
            elif kwargs.get("propagation") is not None or mode == "per_frame":
                tracker.start_phase("propagation pass")
            else:
                tracker.start_phase("extended attention over all frames")
            return super().make_control(n, **kwargs)

    held_before = [latents, source, clean]
    tracker.preexisting([*unet.parameters(), *vae.parameters(), *held_before, emb]
                        + ([] if guide is None else [guide.conditions, *guide.model.parameters()]))
    with torch.no_grad(), FusedAttention(), tracker:
        new = denoise_step(unet, schedule, settings, prompts, latents, source, 981, 961,
                           settings.injection(0, 50), keyframes, PhaseWatch(), controlnet=guide)
        del new
        record_bytes = sum(_bytes([*r.source_inputs.values(), *r.edited_outputs.values()]) for r in recorded)
        recorded.clear()  # the step is over: its tokens are freed
        # one inversion forward (a single branch, inversion prompt) of a batch of frames
        tracker.start_phase("inversion")
        b = min(inversion_batch_size, frames)
        unet(latents[:b].to(torch_dtype), 1, emb.expand(b, -1, -1))
        # the VAE stages, as the pipeline runs them: inversion.batch_size frames per forward; the
        # images come from host memory (not counted), their device copy is
        tracker.start_phase("vae encode")
        images = torch.empty(b, 3, size, size, device="meta")
        tracker.preexisting([images])
        encoded = encode_batch(vae, images)
        del encoded, images
        tracker.start_phase("vae decode")
        decoded = decode_batch(vae, latents[:b])
        del decoded
    held = _bytes(held_before)
    peaks = tracker.phase_peaks
    gib = lambda x: x / GIB  # noqa: E731
    largest = max(peaks.values())
    return Estimate(
        frames=frames, keyframes=len(keyframes) if keyframes else 0, size=size, dtype=dtype, mode=mode,
        weights_gib=gib(weights), latents_gib=gib(held), recorded_gib=gib(record_bytes),
        keyframe_pass_peak_gib=gib(peaks.get("keyframe pass", peaks.get("extended attention over all frames", 0))),
        propagation_peak_gib=gib(peaks.get("propagation pass", 0)),
        inversion_peak_gib=gib(peaks["inversion"]), vae_encode_peak_gib=gib(peaks["vae encode"]),
        vae_decode_peak_gib=gib(peaks["vae decode"]), total_gib=gib(weights + held + largest), vae_batch_size=b,
        controlnet=controlnet,
    )


# ----------------------------------------------------------------------------- report


def markdown(rows: list[Estimate], budget_gib: float, overhead_gib: float) -> str:
    r0 = rows[0]
    lines = [
        f"Estimated device memory, GiB ({r0.dtype}, {r0.size}x{r0.size}, mode {r0.mode}; "
        f"budget {budget_gib:g} GiB with {overhead_gib:g} GiB left for CUDA context and fragmentation; "
        f"VAE and inversion batches of {r0.vae_batch_size} frames"
        + ("; with ControlNet: its weights in weights, each pass's control images and residuals in its peak"
           if r0.controlnet else "") + ")",
        "",
        "| frames | keyframes | weights | latents | recorded tokens | keyframe pass peak | propagation peak "
        "| inversion peak | VAE encode peak | VAE decode peak | total | fits |",
        "|" + "---|" * 12,
    ]
    for r in rows:
        fits = "yes" if r.total_gib + overhead_gib <= budget_gib else "no"
        lines.append(
            f"| {r.frames} | {r.keyframes} | {r.weights_gib:.2f} | {r.latents_gib:.2f} | {r.recorded_gib:.2f} "
            f"| {r.keyframe_pass_peak_gib:.2f} | {r.propagation_peak_gib:.2f} | {r.inversion_peak_gib:.2f} "
            f"| {r.vae_encode_peak_gib:.2f} | {r.vae_decode_peak_gib:.2f} | {r.total_gib:.2f} | {fits} |"
        )
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _chunk(text: str) -> int | None:
    if text.lower() in ("null", "none"):
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or null, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.memory_estimate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--model", choices=MODELS, default="sd21_base",
                   help="the architecture, by its preset name (tokenflow.models.presets; default sd21_base)")
    p.add_argument("--frames", type=_ints, default=[40, 120, 450, 1000], help="comma list of frame counts")
    p.add_argument("--size", type=int, default=None,
                   help="frame side in pixels, a multiple of 64 (default: the model's native size, 512 for sd21_base)")
    p.add_argument("--dtype", choices=DTYPES, default="float16")
    p.add_argument("--mode", choices=MODES, default="tokenflow")
    p.add_argument("--keyframe-interval", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8, help="tokenflow.batch_size: frames per propagation forward")
    p.add_argument("--inversion-batch-size", type=int, default=8)
    p.add_argument("--ff-chunk", type=_chunk, default=16384,
                   help="tokenflow.ff_chunk: feed-forward tokens per chunk (default as conf/config.yaml; 'null': none)")
    p.add_argument("--controlnet", action="store_true",
                   help="with a ControlNet of the model's family on every pass (controlnet=canny|frames)")
    p.add_argument("--budget-gib", type=float, default=24.0)
    p.add_argument("--overhead-gib", type=float, default=1.5)
    p.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    size = MODELS[args.model][3] if args.size is None else args.size
    rows = []
    for n in args.frames:
        print(f"[memory_estimate] {n} frames ...", file=sys.stderr, flush=True)
        try:
            rows.append(estimate(n, size, args.dtype, args.mode, args.keyframe_interval, args.batch_size,
                                 args.inversion_batch_size, args.ff_chunk, model=args.model, controlnet=args.controlnet))
        except ValueError as e:
            p.error(str(e))
    report = markdown(rows, args.budget_gib, args.overhead_gib)
    print(report)
    if args.markdown:
        args.markdown.write_text(report)
        print(f"[memory_estimate] wrote {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
