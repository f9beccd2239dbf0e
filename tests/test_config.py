"""One source of settings: config.py holds every default, the command line is checked against it
(every key at every depth, with or without +, every group option, every value's type), and range
errors name the override as the user types it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tokenflow.config import ConfigError, FramesConfig, PnPConfig, RunConfig, SDEditConfig, TokenFlowConfig, load_config
from tokenflow.hydra_config import conf_dir, fresh_dir
from tokenflow.models.presets import PRESETS
from tokenflow.overrides import prepare

REPO = Path(__file__).resolve().parents[1]


def _leaves(obj, prefix=""):
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _leaves(getattr(obj, f.name), f"{prefix}{f.name}.")
    else:
        yield prefix[:-1], obj


def test_composed_defaults_are_the_dataclasses_defaults():
    """conf/config.yaml picks group options only: every other value of a plain run is config.py's."""
    composed = dict(_leaves(load_config([])))
    defaults = dict(_leaves(RunConfig()))
    model = PRESETS["sd21_base"]
    defaults.update({"model.name": model.name, "model.source": model.source, "model.native_size": model.native_size})
    assert composed == defaults
    conf = yaml.safe_load((conf_dir() / "config.yaml").read_text())
    assert set(conf) == {"defaults", "hydra"}  # no setting has a second default in YAML


def test_model_presets_bring_their_source_size_and_step_counts():
    cfg = load_config(["model=tiny"])
    assert (cfg.model.name, cfg.model.source, cfg.model.native_size) == ("tiny", "random", 128)
    assert (cfg.steps, cfg.inversion.steps) == (10, 20)  # the tiny preset's run overrides
    assert load_config(["model=tiny", "steps=3"]).steps == 3  # the command line wins over a preset
    sd15 = load_config(["model=sd15"])
    assert (sd15.model.source, sd15.steps) == (PRESETS["sd15"].source, 50)
    assert load_config(["model=sd21"]).model.native_size == 768


def test_method_group_picks_the_techniques_dataclass():
    assert isinstance(load_config([]).method, PnPConfig)
    sd = load_config(["method=sdedit", "method.strength=0.3"])
    assert isinstance(sd.method, SDEditConfig) and sd.method.strength == 0.3
    assert load_config(["experiment=table1_per_frame"]).tokenflow.mode == "per_frame"


@pytest.mark.parametrize("args,message", [
    (["method.strenght=0.7"], "unknown key method.strenght (did you mean method.strength?)"),
    (["+method.strenght=0.7"], "unknown key +method.strenght (did you mean method.strength?)"),
    (["method=sdedit", "+method.strenght=0.7"], "unknown key +method.strenght (did you mean method.strength?)"),
    (["model.sorce=x"], "unknown key model.sorce (did you mean model.source?)"),
    (["+promt=a cat"], "unknown key +promt (did you mean prompt?)"),
    (["tokenflow.keyframe_intervall=4"], "unknown key tokenflow.keyframe_intervall (did you mean tokenflow.keyframe_interval?)"),
    (["model=tni"], "unknown model tni (choose one of sd21_base, sd21, sd20_base, sd15, tiny, tiny_sd15)"),
    (["model=tinyy"], "unknown model tinyy (did you mean tiny? choose one of"),
    (["-m", "model=tiny,tni"], "unknown model tni"),
    (["method=pnpp"], "unknown method pnpp (did you mean pnp?"),
    (["experiment=papr"], "unknown experiment papr (did you mean paper?"),
    (["method.strength=0.7"], "method.strength belongs to method=sdedit; this run uses method=pnp"),
    (["steps=abc"], "steps=abc: steps must be an integer"),
    (["output.side_by_side=maybe"], "output.side_by_side must be true or false"),
    (["steps=null"], "steps cannot be null"),
    (["+steps=4"], "+steps: steps is already a setting"),
    (["frames=3"], "frames is a section"),
    (["frames.start.x=3"], "unknown key frames.start.x"),
    (["~steps"], "settings cannot be deleted"),
])
def test_unknown_keys_options_and_types_are_one_line_with_the_nearest_name(args, message):
    with pytest.raises(ConfigError) as e:
        prepare(args)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("override,message", [
    ("frames.stride=0", "frames.stride must be an integer >= 1, got 0"),
    ("frames.end=2", "frames.end (2) must be greater than frames.start (5)"),
    ("tokenflow.keyframe_interval=0", "tokenflow.keyframe_interval must be an integer >= 1"),
    ("tokenflow.mode=magic", "tokenflow.mode must be one of tokenflow, fixed_keyframes, per_frame, extended_all, reconstruction"),
    ("tokenflow.propagation=theirs", "tokenflow.propagation must be one of paper, released"),
    ("inversion.steps=0", "inversion.steps must be an integer >= 1"),
    ("output.crf=99", "output.crf must be an integer in [0, 51]"),
    ("output.fps=-5", "output.fps must be null"),
    ("size=huge", "size must be null (the model's native size), full"),
    ("size=[100]", "size must be null"),
    ("prompt=   ", "prompt is empty"),
    ("device=gpu", "device must be auto | cpu | cuda | cuda:N"),
    ("dtype=float8", "dtype must be one of auto, float32, float16, bfloat16"),
    ("model.prediction_type=x0", "model.prediction_type must be one of"),
    ("method.qk_fraction=1.5", "method.qk_fraction must be in [0, 1]"),
    ("guidance_scale=nan", "guidance_scale must be a finite number, got nan"),
    ("output.fps=inf", "output.fps must be null"),
])
def test_range_errors_name_the_override(override, message):
    extra = ["frames.start=5"] if override.startswith("frames.end") else []
    with pytest.raises(ConfigError) as e:
        load_config([*extra, override])
    assert message in str(e.value)


@pytest.mark.parametrize("strength", ["0", "1.5", "-0.2"])
def test_sdedit_strength_is_checked_once_with_its_override_name(strength):
    with pytest.raises(ConfigError, match=r"method.strength must be in \(0, 1\]"):
        load_config(["method=sdedit", f"method.strength={strength}"])


def test_checks_belong_to_the_sections_themselves():
    """The same checks whoever builds a section (a tool, a test, EditSettings)."""
    with pytest.raises(ConfigError, match="frames.max must be an integer >= 1 or null"):
        FramesConfig(max=0)
    with pytest.raises(ConfigError, match="fixed_keyframes"):
        TokenFlowConfig(mode="fixed_keyframes", propagation="released")


def test_from_dict_reads_a_runs_config_back_literally():
    cfg = load_config(["model=tiny", "prompt=costs ${price}, 100%"])
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.prompt == "costs ${price}, 100%"
    with pytest.raises(ConfigError, match="unknown key output.colour"):
        RunConfig.from_dict({**cfg.to_dict(), "output": {**cfg.to_dict()["output"], "colour": 1}})


def test_fresh_dir_never_hands_out_a_folder_twice(tmp_path):
    base = str(tmp_path / "outputs" / "12-00-00")
    first = fresh_dir(base)
    assert first == base and Path(first).is_dir()
    assert fresh_dir(base) == first  # asked again by the same run before it wrote anything
    (Path(first) / "run.json").write_text("{}")
    assert fresh_dir(base) == base + "-2"  # a later run of this process, same second


def test_two_processes_in_the_same_second_get_two_folders(tmp_path):
    code = ("import sys; from tokenflow.hydra_config import fresh_dir; import time; "
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); print(fresh_dir(sys.argv[1]))")
    import time

    start = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run"), str(start)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    dirs = [p.communicate()[0].strip() for p in procs]
    assert len(set(dirs)) == 4 and all(Path(d).is_dir() for d in dirs)
