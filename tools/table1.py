"""The paper's Table 1 for our implementation: warp error, CLIP score, time and memory per method.

    python -m tools.table1 --pairs "wolf.mp4::a marble sculpture of a wolf" --pairs "sample::a watercolor painting"
    python -m tools.table1 --pairs-file pairs.txt --model tiny --out-dir outputs/table1_tiny frames.max=16 size=128

For every (video, prompt) pair, six runs of tokenflow.pipeline.run_edit, each configured by
tokenflow.config.load_config with `experiment=table1_<mode>` and the user's overrides:
  LDM reconstruction (encode/decode only), PnP per frame, TokenFlow without propagation (extended
  attention across all frames), TokenFlow without random keyframes (fixed), TokenFlow, and TokenFlow
  with the released code's propagation rule (not in the paper; its paper columns read "-").
Each run is scored:
- warp error (tools.warp_error, x1e-3): flow on the SOURCE frames exactly as the pipeline read and
  resized them (tokenflow.inputs.load_video with the run's config), edited frames from the run's
  lossless PNGs (output.png_frames=true is forced: an H.264 round trip would add its own error);
- CLIP score (tools.clip_score, frame-mean cosine to the pair's prompt; the reconstruction row too,
  as the paper's 0.23), or "n/a" when no CLIP weights can be had (said once);
- seconds per frame and peak memory from the run's run.json.
Every run executes in a fresh process (spawned), so its peak memory is its own: RSS (and CUDA peak
allocation) are process-wide high-water marks that never go down. `--in-process` trades that for
speed. The four edit runs of a pair share one inversion through the inversion cache: the first run
that needs it computes it, the others reload it, so compare "s/frame (editing)".
Writes <out-dir>/table1.md (means over pairs, with the paper's numbers beside them) and
<out-dir>/table1.csv (the mean rows and one row per pair and method).

On a cluster (the .[cluster] extra): `--sweep LAUNCHER` runs every cell as one job of ONE Hydra
multirun (`tokenflow -m`) on hydra/launcher=LAUNCHER (joblib, submitit_local, submitit_slurm; basic:
one after the other), each (pair, method) an experiment config written into <out-dir>/sweep_conf;
`--launcher-arg hydra.launcher.gpus_per_node=1` etc. go to that command. It then collects the
finished folder (a cell whose job wrote no run.json is a row with that error). `--collect DIR` scores
any finished multirun folder of tokenflow runs (output.png_frames=true) into the table: each run's
pair is its config.yaml's video and prompt, its method its tokenflow.mode (and propagation), so a
sweep started by hand, or on another machine, counts too (a failed job leaves no folder to find).

    python -m tools.table1 --pairs-file pairs.txt --sweep submitit_slurm --launcher-arg hydra.launcher.partition=gpu
    python -m tools.table1 --collect outputs/table1/multirun
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import re
import subprocess
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from tokenflow.config import RunConfig
from tokenflow.models.presets import RANDOM  # model.source of a preset's architecture with seeded random weights

from .run_config import add_run_flags, flag_overrides

# (mode, row label, paper's warp error x1e-3, paper's CLIP score): Table 1 of the paper
METHODS = (
    ("reconstruction", "LDM reconstruction", 2.0, 0.23),
    ("per_frame", "PnP-Diffusion per frame", 11.3, 0.33),
    ("extended_all", "TokenFlow w/o propagation (ext. attn. all frames)", 5.9, 0.33),
    ("fixed_keyframes", "TokenFlow w/o random keyframes", 3.7, 0.33),
    ("tokenflow", "TokenFlow", 3.0, 0.33),
    # not in the paper: the same method with the released code's propagation rule (README, "Two
    # propagation rules"), so paper vs released are compared on the same clips in one command
    ("tokenflow_released", "TokenFlow, released code's propagation", None, None),
)
MODES = tuple(m[0] for m in METHODS)
METRICS = ("warp_error_x1e-3", "clip_score", "sec_per_frame_editing", "sec_per_frame_total", "peak_memory_mb")
CSV_COLUMNS = ("scope", "pair", "video", "prompt", "method", "label", *METRICS, "memory_kind", "pairs", "run_dir", "error")
PAIR_SEPARATOR = "::"


@dataclass
class Pair:
    video: str
    prompt: str


def parse_pair(text: str) -> Pair:
    """ "VIDEO::PROMPT" -> Pair (the video may be "sample", the project's generated clip)."""
    if PAIR_SEPARATOR not in text:
        raise ValueError(f"pair {text!r} is not VIDEO{PAIR_SEPARATOR}PROMPT, e.g. 'wolf.mp4::a marble sculpture of a wolf'")
    video, prompt = (s.strip() for s in text.split(PAIR_SEPARATOR, 1))
    if not video or not prompt:
        raise ValueError(f"pair {text!r} has an empty {'video' if not video else 'prompt'}")
    return Pair(video, prompt)


def read_pairs_file(path: Path | str) -> list[Pair]:
    """One VIDEO::PROMPT per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pairs file not found")
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                pairs.append(parse_pair(line))
            except ValueError as e:
                raise ValueError(f"{path}:{number}: {e}") from None
    return pairs


@dataclass
class Row:
    """One method on one pair (scope "pair"), or its mean over pairs (scope "mean")."""

    scope: str
    pair: str  # pair number, or "all"
    video: str
    prompt: str
    method: str
    label: str
    metrics: dict[str, float | None] = field(default_factory=dict)  # METRICS -> value (None: n/a)
    memory_kind: str = ""
    pairs: int = 1  # pairs that ran (for a mean row)
    run_dir: str = ""
    error: str = ""


# ------------------------------------------------------------------------------------- running


def _child(cfg: RunConfig, run_dir: str, conn) -> None:
    """Spawned: one run_edit, reporting success or the error (type and message) through `conn`."""
    try:
        from tokenflow.pipeline import run_edit

        run_edit(cfg, run_dir)
        conn.send(("ok", ""))
    except BaseException as e:  # the parent decides; the traceback goes to this run's stderr
        traceback.print_exc()
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def run_one(cfg: RunConfig, run_dir: Path, *, in_process: bool = False) -> str:
    """Run the pipeline on `cfg` into run_dir; returns "" on success, else the error text."""
    if in_process:
        from tokenflow.pipeline import run_edit

        try:
            run_edit(cfg, run_dir)
        except Exception as e:  # one failed cell is a row with its error, not a lost table
            return f"{type(e).__name__}: {e}"
        return ""
    ctx = multiprocessing.get_context("spawn")  # fresh interpreter: its own RSS / CUDA high-water marks
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(cfg, str(run_dir), child))
    process.start()
    child.close()
    try:
        status, message = parent.recv()
    except EOFError:  # died without a word: killed (out of memory) or crashed
        status, message = "error", "the run's process died without reporting"
    process.join()
    if status == "ok" and process.exitcode == 0:
        return ""
    return message or f"the run's process exited with code {process.exitcode} (out of memory?)"


def run_config(pair: Pair, mode: str, user_overrides: list[str]) -> RunConfig:
    """The checked config of one Table 1 cell (`user_overrides` as typed on a tokenflow command line).
    The pair's video and prompt are set on the config itself (no quoting of paths or prompts through
    the override grammar); PNG frames are forced on."""
    from tokenflow.config import load_config

    cfg = load_config(["progress=false", f"experiment=table1_{mode}", *user_overrides, "output.png_frames=true"])
    return replace(cfg, video=pair.video, prompt=pair.prompt)


def source_frames(cfg: RunConfig) -> np.ndarray:
    """uint8 [F, H, W, 3]: the source exactly as run_edit read and resized it (same function, same config)."""
    from tokenflow.inputs import load_video

    return load_video(cfg).frames.numpy()


def edited_frames(run_dir: Path) -> np.ndarray:
    from tokenflow.media import read_video

    return read_video(run_dir / "frames").frames.numpy()


class ClipScorer:
    """CLIP for the table's scores, on the device only while it scores: CLIP ViT-L/14 holds about
    1.7 GB in float32, which the runs before it should have. `scoring()` loads it once, after the
    runs, and frees it when its block ends. When the weights cannot be had it says why once and
    scores None."""

    def __init__(self, model: str | None, device: str = "cpu"):
        self.model, self.device, self.loaded = model, device, None
        if model is None:
            print("CLIP score skipped: --no-clip")

    @contextmanager
    def scoring(self):
        if self.model is not None:
            from tools.clip_score import ClipUnavailable, load_clip

            try:
                self.loaded = load_clip(self.model, device=self.device)
            except ClipUnavailable as e:
                print(f"CLIP score skipped: {e}")
        try:
            yield self
        finally:
            self.loaded = None  # freed: the caller keeps no reference
            if str(self.device).startswith("cuda"):
                import torch

                torch.cuda.empty_cache()  # hand its memory back, not only to PyTorch's cache

    def __call__(self, frames: np.ndarray, prompt: str) -> float | None:
        if self.loaded is None:
            return None
        from tools.clip_score import clip_score_or_none

        result = clip_score_or_none(frames, prompt, model=self.loaded)
        return None if result is None else result.mean


def run_metrics(run_dir: Path, source: np.ndarray, prompt: str, clip: ClipScorer | None, flow: str) -> tuple[dict, str]:
    """METRICS of one finished run, and which memory its peak is (clip None: the CLIP score later)."""
    from tools.warp_error import warp_error

    facts = json.loads((run_dir / "run.json").read_text())
    edited = edited_frames(run_dir)
    spf = facts["seconds_per_frame"]
    memory = facts["peak_memory_mb"]
    kind = "cuda_allocated" if "cuda_allocated" in memory else "cpu_rss"
    metrics = {
        "warp_error_x1e-3": warp_error(source, edited, method=flow).mean if len(source) > 1 else None,
        "clip_score": None if clip is None else clip(edited, prompt),
        "sec_per_frame_editing": spf.get("editing"),  # none for the reconstruction: nothing is edited
        "sec_per_frame_total": round(sum(spf.values()), 4),
        "peak_memory_mb": memory[kind],
    }
    return metrics, kind


def mean_rows(rows: list[Row], n_pairs: int) -> list[Row]:
    """Per method: the mean of each metric over the pairs where it exists."""
    out = []
    for mode, label, _, _ in METHODS:
        mine = [r for r in rows if r.method == mode and not r.error]
        metrics = {}
        for name in METRICS:
            values = [r.metrics[name] for r in mine if r.metrics.get(name) is not None]
            metrics[name] = float(np.mean(values)) if values else None
        kinds = sorted({r.memory_kind for r in mine})
        errors = [r.error for r in rows if r.method == mode and r.error]
        out.append(Row("mean", "all", "", "", mode, label, metrics, "/".join(kinds), len(mine),
                       error=f"{len(errors)} of {n_pairs} pairs failed" if errors else ""))
    return out


@dataclass
class Table1:
    means: list[Row]
    rows: list[Row]  # per pair
    markdown: Path
    csv: Path


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit] or "x"


def table1(
    pairs: list[Pair], out_dir: Path | str, *, overrides: list[str] = (), clip_model: str | None = None,
    flow: str = "dis", in_process: bool = False, modes: tuple[str, ...] = MODES,
) -> Table1:
    """Run every method on every pair, score them, write table1.md and table1.csv into out_dir."""
    from tokenflow.device import pick_device

    check_request(pairs, modes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # every config is composed and every video opened before anything runs: a bad override or a
    # missing clip fails in a second, not after an hour of the other pairs' runs
    configs = {(i, mode): run_config(pair, mode, list(overrides)) for i, pair in enumerate(pairs) for mode in modes}
    check_inputs(pairs, [configs[i, modes[0]] for i in range(len(pairs))])
    clip = ClipScorer(clip_model, device=pick_device(configs[0, modes[0]].device))
    labels = {m[0]: m[1] for m in METHODS}
    rows = []
    for i, pair in enumerate(pairs):
        pair_dir = out_dir / f"pair{i:02d}_{slug(Path(pair.video).stem)}"
        try:
            source, source_error = source_frames(configs[i, modes[0]]), ""
        except (ValueError, OSError) as e:  # an unreadable video fails its own rows, not the table
            source, source_error = None, f"{type(e).__name__}: {e}"
        for mode in modes:
            run_dir = pair_dir / mode
            print(f"[table1] pair {i} ({pair.video} :: {pair.prompt}) {mode} -> {run_dir}", file=sys.stderr)
            row = Row("pair", str(i), pair.video, pair.prompt, mode, labels[mode], run_dir=str(run_dir))
            row.error = source_error or run_one(configs[i, mode], run_dir, in_process=in_process)
            if not row.error:
                try:
                    row.metrics, row.memory_kind = run_metrics(run_dir, source, pair.prompt, None, flow)
                except (ValueError, OSError, RuntimeError) as e:  # the finished runs above still count
                    row.error = f"scoring: {type(e).__name__}: {e}"
            if row.error:
                print(f"[table1] {mode} on pair {i} failed: {row.error}", file=sys.stderr)
            rows.append(row)
    scored = [r for r in rows if not r.error]
    if scored and clip_model is not None:
        with clip.scoring():  # CLIP on the device only now, after every run, and freed after
            for row in scored:
                try:
                    row.metrics["clip_score"] = clip(edited_frames(Path(row.run_dir)), row.prompt)
                except (ValueError, OSError, RuntimeError) as e:
                    row.error = f"scoring: {type(e).__name__}: {e}"
                    print(f"[table1] {row.method} on pair {row.pair} failed: {row.error}", file=sys.stderr)
    means = mean_rows(rows, len(pairs))
    random = any(cfg.model.source == RANDOM for cfg in configs.values())
    md = write_markdown(out_dir / "table1.md", means, pairs, list(overrides), flow, random_weights=random)
    table = write_csv(out_dir / "table1.csv", means + rows)
    return Table1(means=means, rows=rows, markdown=md, csv=table)


# ------------------------------------------------------------------------------------- writing


def fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


DIGITS = {"warp_error_x1e-3": 3, "clip_score": 4, "sec_per_frame_editing": 3, "sec_per_frame_total": 3, "peak_memory_mb": 1}


def markdown_table(means: list[Row]) -> str:
    paper = {m[0]: (m[2], m[3]) for m in METHODS}
    head = ("method", "warp err. (x1e-3) ↓", "CLIP score ↑", "s/frame (editing)", "s/frame (total)",
            "peak memory (MB)", "pairs", "paper warp err.", "paper CLIP")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in means:
        m = r.metrics
        cells = [r.label, *(fmt(m.get(k), DIGITS[k]) for k in METRICS), str(r.pairs),
                 *("-" if v is None else f"{v}" for v in paper[r.method])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


RANDOM_WEIGHTS_NOTE = ("Random weights (model.source=random): every edit is noise, so these numbers only show that the "
                       "measurements run; they say nothing about TokenFlow and are not comparable with the paper's columns.")


def check_inputs(pairs: list[Pair], configs: list[RunConfig]) -> None:
    """Refuse, before any run, pairs whose prompt is empty or whose video cannot be opened with its
    frame selection (all of them named at once)."""
    from tokenflow.media import read_video

    problems = []
    for i, (pair, cfg) in enumerate(zip(pairs, configs)):
        if not pair.prompt.strip():
            problems.append(f"pair {i} ({pair.video}): the prompt is empty")
        if pair.video == "sample":
            continue
        sel = cfg.frames
        try:
            read_video(pair.video, start=sel.start, end=sel.end, stride=sel.stride, max_frames=1)
        except (ValueError, OSError) as e:
            problems.append(f"pair {i}: {type(e).__name__}: {e}")
    if problems:
        raise ValueError("nothing was run; " + "; ".join(problems))


def write_markdown(path: Path, means: list[Row], pairs: list[Pair], overrides: list[str], flow: str,
                   random_weights: bool = False) -> Path:
    kinds = sorted({r.memory_kind for r in means if r.memory_kind})
    text = [
        "# Table 1: temporal consistency and edit fidelity",
        "",
        markdown_table(means),
        "",
        f"Means over {len(pairs)} pair(s): " + "; ".join(f"`{p.video}` :: \"{p.prompt}\"" for p in pairs) + ".",
        f"Overrides: `{' '.join(overrides) or '(none)'}`. Warp error: {flow} optical flow on the source frames "
        "(Lai et al. 2018, x1e-3). CLIP score: frame-mean cosine to the prompt, n/a without CLIP weights.",
        f"Peak memory: {', '.join(kinds) or 'n/a'} of each run's own process. The edit runs of a pair share one "
        "cached inversion: the first edit run's s/frame (total) includes computing it, the others reload it, so "
        "compare methods on s/frame (editing).",
    ]
    if random_weights:
        text += ["", f"**{RANDOM_WEIGHTS_NOTE}**"]
    for r in means:
        if r.error:
            text.append(f"- {r.label}: {r.error} (see table1.csv)")
    path.write_text("\n".join(text) + "\n")
    return path.resolve()


def write_csv(path: Path, rows: list[Row]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            values = [fmt(r.metrics.get(k), DIGITS[k] + 3) for k in METRICS]  # more digits than the md
            writer.writerow([r.scope, r.pair, r.video, r.prompt, r.method, r.label, *values, r.memory_kind, r.pairs,
                             r.run_dir, r.error])
    return path.resolve()


# ------------------------------------------------------------------------------------- command


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException

    from tools.clip_score import DEFAULT_MODEL
    from tools.optical_flow import METHODS as FLOWS

    parser = argparse.ArgumentParser(
        prog="python -m tools.table1",
        description="The paper's Table 1 for this implementation: LDM reconstruction, per-frame PnP, TokenFlow "
                    "without propagation, with fixed keyframes, and TokenFlow, on each VIDEO::PROMPT pair; warp "
                    "error, CLIP score, seconds per frame and peak memory. Writes table1.md and table1.csv.",
        allow_abbrev=False,
    )
    parser.add_argument("--pairs", action="append", default=[], metavar="VIDEO::PROMPT",
                        help='a video (file, image folder or "sample") and its edit prompt; repeat for more pairs')
    parser.add_argument("--pairs-file", default=None, help="a file of VIDEO::PROMPT lines (# comments allowed)")
    parser.add_argument("--out-dir", default="outputs/table1", help="where runs and tables go (default outputs/table1)")
    parser.add_argument("--clip-model", default=DEFAULT_MODEL,
                        help=f"CLIP weights: a transformers CLIPModel folder or hub id (default {DEFAULT_MODEL})")
    parser.add_argument("--no-clip", action="store_true", help="do not compute the CLIP score")
    parser.add_argument("--flow", default="dis", choices=FLOWS, help="optical flow of the warp error (default dis)")
    parser.add_argument("--methods", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--sweep", default=None, metavar="LAUNCHER",
                        help="run the cells as one Hydra multirun on hydra/launcher=LAUNCHER (joblib, submitit_local, "
                             "submitit_slurm, basic), then collect it")
    parser.add_argument("--launcher-arg", action="append", default=[], metavar="OVERRIDE",
                        help="an override for the sweep's command, e.g. hydra.launcher.n_jobs=4 (repeatable)")
    parser.add_argument("--collect", default=None, metavar="DIR", help="score a finished multirun folder into the table")
    parser.add_argument("--in-process", action="store_true",
                        help="run everything in this process (faster start; peak memory then accumulates over runs)")
    add_run_flags(parser)
    args = parser.parse_intermixed_args(argv)
    try:
        pairs = [parse_pair(p) for p in args.pairs]
        if args.pairs_file:
            pairs += read_pairs_file(args.pairs_file)
        clip_model = None if args.no_clip else args.clip_model
        modes = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        if args.sweep:
            sweep_dir, cells = run_sweep(pairs, args.out_dir, flag_overrides(args), args.sweep, args.launcher_arg, modes)
            result = collect(sweep_dir, args.out_dir, clip_model=clip_model, flow=args.flow, cells=cells)
        elif args.collect:
            result = collect(args.collect, args.out_dir, clip_model=clip_model, flow=args.flow)
        else:
            result = table1(pairs, args.out_dir, overrides=flag_overrides(args), clip_model=clip_model, flow=args.flow,
                            in_process=args.in_process, modes=modes)
    except (ValueError, FileNotFoundError, HydraException) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(result.means))
    if RANDOM_WEIGHTS_NOTE in result.markdown.read_text():
        print(f"\nnote: {RANDOM_WEIGHTS_NOTE}")
    print(f"wrote {result.markdown}")
    print(f"wrote {result.csv}")
    failed = [r for r in result.rows if r.error]
    return 1 if failed else 0



# ------------------------------------------------------------------------------------- sweeps and collecting

SWEEP_PREFIX = "t1"  # experiment names of a sweep's cells: t1_p00_tokenflow


def _yaml_text(text: str) -> str:
    """`text` as a single-quoted YAML scalar that OmegaConf reads back as exactly `text` (no interpolation)."""
    return "'" + text.replace("'", "''").replace("${", "\\${") + "'"


def sweep_experiments(pairs: list[Pair], modes: tuple[str, ...], folder: Path) -> list[str]:
    """One experiment config per cell into folder/experiment/: the table's experiment_<mode> with the
    pair's video and prompt set -> the experiment names, pair by pair."""
    from tokenflow.hydra_config import conf_dir

    conf = conf_dir() / "experiment"
    (folder / "experiment").mkdir(parents=True, exist_ok=True)
    names = []
    for i, pair in enumerate(pairs):
        video = pair.video if pair.video == "sample" else str(Path(pair.video).expanduser().resolve())
        for mode in modes:
            name = f"{SWEEP_PREFIX}_p{i:02d}_{mode}"
            body = (conf / f"table1_{mode}.yaml").read_text()
            (folder / "experiment" / f"{name}.yaml").write_text(
                body.rstrip("\n") + f"\nvideo: {_yaml_text(video)}\nprompt: {_yaml_text(pair.prompt)}\n")
            names.append(name)
    return names


def sweep_command(names: list[str], folder: Path, sweep_dir: Path, overrides: list[str], launcher: str,
                  launcher_args: list[str]) -> list[str]:
    """The `tokenflow -m` command of the whole table (PNG frames forced on, as in-process runs)."""
    cmd = [sys.executable, "-m", "tokenflow.cli", "-m", f"experiment={','.join(names)}",
           f"hydra.searchpath=[file://{folder.resolve()}]", f"hydra.sweep.dir={sweep_dir.resolve()}", "progress=false"]
    if launcher != "basic":
        cmd.append(f"hydra/launcher={launcher}")
    return cmd + list(launcher_args) + list(overrides) + ["output.png_frames=true"]


def check_request(pairs: list[Pair], modes: tuple[str, ...]) -> None:
    """At least one pair, and only Table 1's methods."""
    if not pairs:
        raise ValueError("no (video, prompt) pairs: give --pairs VIDEO::PROMPT or --pairs-file")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; Table 1 has {list(MODES)}")


def run_sweep(pairs: list[Pair], out_dir: Path | str, overrides: list[str], launcher: str, launcher_args: list[str],
              modes: tuple[str, ...] = MODES) -> tuple[Path, list[tuple[Pair, str]]]:
    """Every cell as one job of one multirun on `launcher` -> (the multirun folder, the cells in job
    order: job k's folder is <folder>/k). A job that fails leaves no run.json: its row carries the
    error when collected."""
    check_request(pairs, modes)
    out_dir = Path(out_dir)
    # `overrides` as typed, as the tokenflow command takes them
    check_inputs(pairs, [run_config(p, modes[0], list(overrides)) for p in pairs])
    folder, sweep_dir = out_dir / "sweep_conf", out_dir / "multirun"
    cmd = sweep_command(sweep_experiments(pairs, modes, folder), folder, sweep_dir, overrides, launcher, launcher_args)
    print(f"[table1] {' '.join(cmd)}", file=sys.stderr)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        print(f"[table1] the sweep exited with code {proc.returncode}; collecting what finished", file=sys.stderr)
    return sweep_dir, [(pair, mode) for pair in pairs for mode in modes]


def job_method(cfg: RunConfig) -> str:
    """The Table 1 method of a run's config: its tokenflow.mode, tokenflow_released for the released rule."""
    tf = cfg.tokenflow
    return "tokenflow_released" if tf.mode == "tokenflow" and tf.propagation == "released" else tf.mode


def read_run_config(run_dir: Path) -> RunConfig:
    """The settings a finished run ran with (its config.yaml, written with its outputs), read literally."""
    from tokenflow.config import read_run_config as read

    return read(run_dir / "config.yaml")


def collect(multirun: Path | str, out_dir: Path | str, *, clip_model: str | None = None, flow: str = "dis",
            cells: list[tuple[Pair, str]] | None = None) -> Table1:
    """Score a finished multirun folder (one folder per finished run, each with its config.yaml and
    run.json) into table1.md and table1.csv in out_dir. `cells`: the (pair, method) of job k, whose
    folder is <multirun>/k (a sweep of run_sweep's), so a job that failed is a row with its error."""
    multirun, out_dir = Path(multirun), Path(out_dir)
    finished = {p.parent for p in multirun.rglob("run.json") if (p.parent / "config.yaml").is_file()}
    jobs = sorted(finished, key=lambda p: str(p)) if cells is None else [multirun / str(k) for k in range(len(cells))]
    if not jobs:
        raise ValueError(f"{multirun}: no job folders (none holds a finished run's run.json and config.yaml): "
                         "is it a tokenflow -m sweep dir?")
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = {m[0]: m[1] for m in METHODS}
    pairs: list[Pair] = []
    rows, configs = [], []
    for k, job in enumerate(jobs):
        cfg = read_run_config(job) if job in finished else None
        if cfg is not None:
            pair, mode = Pair(str(cfg.video), str(cfg.prompt)), job_method(cfg)
            configs.append(cfg)
        else:  # a cell of a sweep whose job left no finished run
            pair, mode = cells[k]
        if pair not in pairs:
            pairs.append(pair)
        i = pairs.index(pair)
        row = Row("pair", str(i), pair.video, pair.prompt, mode, labels.get(mode, mode), run_dir=str(job))
        if cfg is None:
            row.error = f"{job}: no run.json (the job failed; see the sweep's output)"
        else:
            try:
                row.metrics, row.memory_kind = run_metrics(job, source_frames(cfg), pair.prompt, None, flow)
            except (ValueError, OSError, RuntimeError, KeyError) as e:
                row.error = f"scoring: {type(e).__name__}: {e}"
        if row.error:
            print(f"[table1] {mode} on pair {i} failed: {row.error}", file=sys.stderr)
        rows.append(row)
    scored = [r for r in rows if not r.error]
    clip = ClipScorer(clip_model, device="cpu")
    if scored and clip_model is not None:
        with clip.scoring():
            for row in scored:
                row.metrics["clip_score"] = clip(edited_frames(Path(row.run_dir)), row.prompt)
    means = mean_rows(rows, len(pairs))
    random = any(cfg.model.source == RANDOM for cfg in configs)
    md = write_markdown(out_dir / "table1.md", means, pairs, [f"collected from {multirun}"], flow, random_weights=random)
    return Table1(means=means, rows=rows, markdown=md, csv=write_csv(out_dir / "table1.csv", means + rows))


if __name__ == "__main__":
    sys.exit(main())
