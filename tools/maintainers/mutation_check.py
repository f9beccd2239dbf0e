"""Single-line bugs put into the algorithm, one at a time, each run against the core tests.

    python -m tools.maintainers.mutation_check                  # every bug below (about a minute each on 2 cores)
    python -m tools.maintainers.mutation_check "PnP" "released" # only those whose name contains one of these

A reader trusts TokenFlow's code because its tests pass; this shows which test fails for each kind
of bug a change could bring in (swapped NN fields, reversed guidance, PnP in the wrong layers, ...).
Every bug is applied to a COPY of the repository in a temporary folder (the working tree is never
touched), the value checks run in full and the Alg. 1 oracle up to its first failing case, and the
failing tests are printed. A bug that no test catches is printed as "NOT CAUGHT"; one whose line
is no longer in the code (after a refactor) as "DOES NOT APPLY": update its line here.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE_VALUE_CHECKS = ["tests/test_intervention_values.py", "tests/test_tokenflow_core.py", "tests/test_controlnet_values.py"]
CORE_ORACLE = "tests/test_algorithm_oracle.py"

# (bug, file, the line as it is, the line with the bug)
MUTANTS = [
 ("Eq. 6 weights applied to the wrong neighbour", "tokenflow/propagation.py",
  "    return w * t_plus + (1 - w) * t_minus", "    return w * t_minus + (1 - w) * t_plus"),
 ("past and future NN fields swapped", "tokenflow/propagation.py",
  "        past=nn_field(frame_inputs, keyframe_inputs[neighbours.past]),\n        future=nn_field(frame_inputs, keyframe_inputs[neighbours.future]),",
  "        past=nn_field(frame_inputs, keyframe_inputs[neighbours.future]),\n        future=nn_field(frame_inputs, keyframe_inputs[neighbours.past]),"),
 ("classifier-free guidance reversed", "tokenflow/edit.py",
  "    _, uncond, cond = unet(", "    _, cond, uncond = unet("),
 ("guidance scale ignored", "sampler/ddim.py",
  "    return uncond + scale * (cond - uncond)", "    return uncond + 1.0 * (cond - uncond)"),
 ("no PnP residual injection", "tokenflow/controls.py",
  "        if path in self.pnp.feature_layers:\n            return inject_source(h, self.frames)",
  "        if path in self.pnp.feature_layers:\n            return h"),
 ("PnP injects q but not k", "tokenflow/controls.py",
  "            q, k = inject_source(q, f), inject_source(k, f)", "            q, k = inject_source(q, f), k"),
 ("source branch attends jointly across frames", "tokenflow/controls.py",
  "        source_out = attention(q[:f], k[:f], v[:f], attn.heads, upcast=attn.upcast)",
  "        source_out = attention(q[:f], k[:f], v[:f], attn.heads, joint_frames=self.joint_frames, upcast=attn.upcast)"),
 ("propagation batch given the first frames' neighbours", "tokenflow/edit.py",
  "Propagation(tokens, neighbours.subset(frames), propagate_source=released)",
  "Propagation(tokens, neighbours.subset(list(range(len(frames)))), propagate_source=released)"),
 ("Eq. 7 ratio inverted (d+ instead of d-)", "tokenflow/propagation.py",
  "    ratio = torch.where(total > 0, d_minus / total.clamp(min=1), torch.zeros_like(total))",
  "    ratio = torch.where(total > 0, d_plus / total.clamp(min=1), torch.zeros_like(total))"),
 ("NN field takes the least similar token", "tokenflow/propagation.py",
  "b[s : s + per_chunk].transpose(1, 2)).argmax(dim=-1)", "b[s : s + per_chunk].transpose(1, 2)).argmin(dim=-1)"),
 ("keyframe pass without extended attention", "tokenflow/edit.py",
  "control = watch.make_control(len(keyframes), pnp=pnp, joint_frames=len(keyframes), record=tokens,",
  "control = watch.make_control(len(keyframes), pnp=pnp, joint_frames=1, record=tokens,"),
 ("keyframe pass given the first K frames' latents", "tokenflow/edit.py",
  "        keyframe_out = forward(keyframes, control)", "        keyframe_out = forward(list(range(len(keyframes))), control)"),
 ("source and negative prompts swapped", "tokenflow/edit.py",
  "context = torch.cat([prompts.source.expand(f, -1, -1), prompts.negative.expand(f, -1, -1),",
  "context = torch.cat([prompts.negative.expand(f, -1, -1), prompts.source.expand(f, -1, -1),"),
 ("released rule: source branch not propagated", "tokenflow/edit.py",
  "Propagation(tokens, neighbours.subset(frames), propagate_source=released)",
  "Propagation(tokens, neighbours.subset(frames), propagate_source=False)"),
 ("released rule: weight on the previous group's keyframe", "tokenflow/propagation.py",
  "    w = _weight(d_prev / (d_cur + d_prev), weighting)", "    w = _weight(d_cur / (d_cur + d_prev), weighting)"),
 ("released rule: distances to the keyframes, not the group centres", "tokenflow/propagation.py",
  "    centre_cur = (interval * group + interval // 2).float()  # c_b",
  "    centre_cur = torch.as_tensor(keyframes)[group].float()  # c_b"),
 ("SDEdit: a noise map per frame", "tokenflow/edit.py",
  "    noise = torch.randn((1, *clean.shape[1:]), generator=g).to(clean)", "    noise = torch.randn(clean.shape, generator=g).to(clean)"),
 ("PnP q/k injection one step too long", "tokenflow/edit.py",
  "qk_layers=self.pnp_qk_layers if step < int(n_steps * self.pnp_qk_fraction) else (),",
  "qk_layers=self.pnp_qk_layers if step <= int(n_steps * self.pnp_qk_fraction) else (),"),
 ("keyframe pass records the wrong branches as T_base", "tokenflow/controls.py",
  "self.record.edited_outputs[attn.path] = out[f:].reshape(2, f, n, c).clone()",
  "self.record.edited_outputs[attn.path] = out[:2 * f].reshape(2, f, n, c).clone()"),
 ("keyframe reuse takes the wrong keyframe's output", "tokenflow/edit.py",
  "new[frames] = step(frames, keyframe_out[slots])",
  "new[frames] = step(frames, keyframe_out[slots[::-1]])"),
 ("DDPM step takes the other frames' noise maps", "tokenflow/edit.py",
  "ddpm_step(schedule, guided, t, t_prev, latents[frames], noise[frames].to(latents))",
  "ddpm_step(schedule, guided, t, t_prev, latents[frames], noise[frames[::-1]].to(latents))"),
 ("PnP q/k injected in the wrong layers (prefix match off)", "tokenflow/controls.py",
  'return any(attn_path.startswith(layer + ".") for layer in self.qk_layers)',
  'return any(attn_path.startswith(layer[:-2]) for layer in self.qk_layers)'),
 ("ControlNet residuals on the source branch too", "tokenflow/controlnet_guide.py",
  "                full[f + lo: f + hi] = part[:c]  # unconditional rows of these frames",
  "                full[lo:hi] = full[f + lo: f + hi] = part[:c]  # unconditional rows of these frames"),
 ("ControlNet given the batch's first frames' control images", "tokenflow/controlnet_guide.py",
  "            cond = self.conditions[frames[lo:hi]].to(x.device, dtype)", "            cond = self.conditions[lo:hi].to(x.device, dtype)"),
 ("ControlNet window starts a step late", "tokenflow/controlnet_guide.py",
  "        return not (step / n_steps < self.start or (step + 1) / n_steps > self.end)",
  "        return not ((step - 1) / n_steps < self.start or (step + 1) / n_steps > self.end)"),
 ("ControlNet's conditional branch given the negative prompt", "tokenflow/controlnet_guide.py",
  "context = torch.cat([negative.expand(c, -1, -1), target.expand(c, -1, -1)])",
  "context = torch.cat([negative.expand(c, -1, -1), negative.expand(c, -1, -1)])"),
]


def apply(root: Path, rel: str, old: str, new: str) -> str | None:
    """Put one bug into root/rel; returns the original text, or None when the line is not there once."""
    path = root / rel
    text = path.read_text()
    if text.count(old) != 1:
        return None
    path.write_text(text.replace(old, new))
    return text


def failing_tests(root: Path) -> list[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = [["--tb=no", *CORE_VALUE_CHECKS], ["--tb=no", "-x", CORE_ORACLE]]
    out = ""
    for args in runs:
        out += subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                              cwd=root, env=env, capture_output=True, text=True).stdout
    return sorted(set(re.findall(r"FAILED (\S+)", out)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.maintainers.mutation_check", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("only", nargs="*", help="run only the bugs whose name contains one of these")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or any(o in m[0] for o in args.only)]
    if not chosen:
        parser.error(f"no bug matches {args.only}; bugs: {[m[0] for m in MUTANTS]}")
    uncaught = 0
    with tempfile.TemporaryDirectory(prefix="tokenflow-mutants-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "outputs", "multirun", "__pycache__", "*.egg-info"))
        for name, rel, old, new in chosen:
            original = apply(copy, rel, old, new)
            if original is None:
                print(f"## {name}: DOES NOT APPLY (its line is not in {rel} exactly once)", flush=True)
                continue
            try:
                failed = failing_tests(copy)
            finally:
                (copy / rel).write_text(original)
            uncaught += not failed
            print(f"## {name}: " + (f"{len(failed)} failing" if failed else "NOT CAUGHT"), flush=True)
            for test in failed:
                print("    " + test.replace("tests/", ""), flush=True)
    return 1 if uncaught else 0


if __name__ == "__main__":
    sys.exit(main())
