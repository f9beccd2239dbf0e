"""Every setting is used, and where it should be: for each key of the config (every leaf of
RunConfig, PnPConfig and SDEditConfig) a test that fails when the pipeline ignores the key or wires
it to the wrong place. `KEY_TESTS` maps each key to the tests that guard it, here or elsewhere in
tests/; docs/settings.md renders the same table (`python tests/test_settings_used.py > docs/settings.md`).

The runs here are the tiny random model on a 64 px clip of a few frames. `spied_run` runs the real
`run_edit` and records, without changing anything, what the stages hand each other: the models'
settings, the UNet's forward batches, the inversion's arguments, the loop's settings, prompts and
start, each step's injection and keyframes, the guidance scale, the chunk sizes, the latents decoded.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import json
import sys
from pathlib import Path

import pytest
import torch

from tokenflow import controls, edit, inversion, outputs, pipeline
from tokenflow.config import (
    ControlNetConfig, FramesConfig, InversionConfig, ModelConfig, OutputConfig, PnPConfig, RunConfig, SDEditConfig, TokenFlowConfig,
    load_config,
)
from tokenflow.device import DeviceError
from tokenflow.edit import EditSettings, keyframes_at
from tokenflow.inputs import load_video
from tokenflow.keyframes import fixed_keyframes
from tokenflow.media.sample_clip import make_sample_clip

REPO = Path(__file__).resolve().parents[1]
HERE = "tests/test_settings_used.py"


def here(name: str) -> str:
    return f"{HERE}::{name}"


CN = "tests/test_controlnet_run.py::"


# ---------------------------------------------------------------------------------------------
# THE TABLE: every key of the config -> the tests that fail when the pipeline ignores or miswires it

KEY_TESTS: dict[str, tuple[str, ...]] = {
    "video": ("tests/test_pipeline.py::test_not_a_video", "tests/test_pipeline.py::test_sample_clip_is_rendered_once_into_the_cache"),
    "frames.start": (here("test_frame_selection_reaches_the_reader"), "tests/test_media_audio.py::test_aac_span_is_copied_in_sync_into_both_videos"),
    "frames.end": (here("test_frame_selection_reaches_the_reader"),),
    "frames.stride": (here("test_frame_selection_reaches_the_reader"), "tests/test_media_audio.py::test_aac_span_is_copied_in_sync_into_both_videos"),
    "frames.max": (here("test_frame_selection_reaches_the_reader"),),
    "frames.folder_fps": (here("test_folder_fps_is_an_image_folders_rate_and_said"),),
    "size": (here("test_size_and_native_size_reach_the_reader"), "tests/test_cli.py::test_size_defaults_to_the_models_native_short_side"),
    "prompt": (here("test_each_prompt_conditions_its_own_branch"),),
    "negative_prompt": (here("test_each_prompt_conditions_its_own_branch"),),
    "inversion_prompt": (here("test_each_prompt_conditions_its_own_branch"), here("test_inversion_cache_is_reused_only_for_the_same_inversion")),
    "seed": (here("test_seed_changes_the_keyframes"),),
    "steps": (here("test_steps_are_the_denoising_steps_run"),),
    "guidance_scale": (here("test_guidance_scale_reaches_the_guidance"),),
    "model.name": ("tests/test_sd15.py::test_pipeline_runs_end_to_end_on_tiny_sd15", "tests/test_loading.py::test_every_preset_builds_random_at_its_architecture",
                   here("test_model_settings_reach_build_models")),
    "model.source": ("tests/test_pipeline.py::test_cli_without_weights_says_what_to_do", here("test_model_settings_reach_build_models")),
    "model.seed": ("tests/test_loading.py::test_random_weights_follow_the_seed", here("test_inversion_cache_is_reused_only_for_the_same_inversion")),
    "model.variant": ("tests/test_pipeline.py::test_seeded_run_is_bit_identical_and_reuses_inversion", here("test_model_settings_reach_build_models")),
    "model.prediction_type": ("tests/test_loading.py::test_prediction_type_overrides_a_folder", here("test_model_settings_reach_build_models")),
    "model.native_size": (here("test_size_and_native_size_reach_the_reader"),),
    "method.name": (here("test_sdedit_runs_its_strength_of_the_steps_without_injection"), here("test_pnp_starts_from_the_inverted_latents")),
    "method.qk_fraction": (here("test_pnp_injection_follows_its_fractions_and_layers"), "tests/test_intervention_values.py::test_pnp_injection_steps_over_an_edit"),
    "method.feature_fraction": (here("test_pnp_injection_follows_its_fractions_and_layers"), "tests/test_intervention_values.py::test_pnp_injection_steps_over_an_edit"),
    "method.qk_layers": (here("test_pnp_injection_follows_its_fractions_and_layers"), "tests/test_intervention_values.py::test_pnp_replaces_qk_and_residuals_of_the_edited_branches_only"),
    "method.feature_layers": (here("test_pnp_injection_follows_its_fractions_and_layers"), "tests/test_intervention_values.py::test_pnp_replaces_qk_and_residuals_of_the_edited_branches_only"),
    "method.strength": (here("test_sdedit_runs_its_strength_of_the_steps_without_injection"), "tests/test_intervention_values.py::test_sdedit_start_shares_one_noise_map_at_the_strengths_timestep"),
    "inversion.method": ("tests/test_ddpm_run.py::test_ddpm_runs_in_every_technique_and_mode", "tests/test_ddpm_run.py::test_ddim_run_passes_no_noise_maps",
                         "tests/test_ddpm_run.py::test_ddpm_cache_is_reused_only_for_the_same_maps"),
    "inversion.steps": (here("test_inversion_cache_is_reused_only_for_the_same_inversion"),),
    "inversion.skip": ("tests/test_ddpm_run.py::test_skip_starts_later_and_inverts_only_the_steps_run",),
    "inversion.source_guidance_scale": ("tests/test_ddpm_run.py::test_forwards_counted_as_the_settings_imply", "tests/test_ddpm_run.py::test_ddpm_cache_is_reused_only_for_the_same_maps",
                                        "tests/test_ddpm_run.py::test_sampling_with_the_maps_returns_the_clean_latents", "tests/test_ddpm_run.py::test_guided_maps_are_keyed_by_the_negative_prompt"),
    "inversion.noise_seed": ("tests/test_ddpm_run.py::test_ddpm_cache_is_reused_only_for_the_same_maps", "tests/test_ddpm_run.py::test_each_frames_noise_depends_on_seed_frame_and_timestep_only"),
    "inversion.shared_noise": ("tests/test_ddpm_run.py::test_ddpm_cache_is_reused_only_for_the_same_maps", "tests/test_ddpm_run.py::test_each_frames_noise_depends_on_seed_frame_and_timestep_only",
                               "tests/test_ddpm_run.py::test_maps_do_not_depend_on_the_batch_or_the_frames_inverted_together"),
    "inversion.batch_size": (here("test_inversion_batch_size_is_the_inversions_forward_batch"),),
    "inversion.cache": (here("test_inversion_cache_false_and_cache_dir"),),
    "inversion.cache_dir": (here("test_inversion_cache_false_and_cache_dir"), "tests/test_pipeline.py::test_sample_clip_is_rendered_once_into_the_cache"),
    "inversion.force": ("tests/test_pipeline.py::test_seeded_run_is_bit_identical_and_reuses_inversion",),
    "tokenflow.mode": (here("test_mode_reaches_the_loop"),),
    "tokenflow.keyframe_interval": (here("test_keyframe_interval_reaches_the_draw"), here("test_every_position_of_a_keyframe_interval_can_be_drawn"),
                                    "tests/test_pipeline.py::test_every_mode_writes_the_source_frames_and_fps"),
    "tokenflow.weighting": (here("test_propagation_rule_and_weighting_reach_the_neighbours"),),
    "tokenflow.propagation": (here("test_propagation_rule_and_weighting_reach_the_neighbours"), "tests/test_intervention_values.py::test_each_propagation_rule_runs_end_to_end"),
    "tokenflow.reuse_keyframes": (here("test_reuse_keyframes_reaches_the_loop"), "tests/test_intervention_values.py::test_keyframe_reuse_saves_forwards_and_changes_nothing"),
    "tokenflow.batch_size": (here("test_tokenflow_batch_size_changes_the_forward_batches_not_the_edit"),),
    "tokenflow.query_chunk": (here("test_query_chunk_reaches_the_attention_and_changes_nothing"),),
    "tokenflow.ff_chunk": (here("test_ff_chunk_reaches_the_unet_and_changes_nothing"),),
    "output.side_by_side": (here("test_output_settings_reach_the_writer"), "tests/test_pipeline.py::test_sample_clip_is_rendered_once_into_the_cache",
                            here("test_bad_output_settings_fail_before_the_models_load")),
    "output.png_frames": (here("test_output_settings_reach_the_writer"), "tests/test_pipeline.py::test_outputs_replace_an_earlier_runs_in_the_same_dir",
                          here("test_bad_output_settings_fail_before_the_models_load")),
    "output.crf": (here("test_output_settings_reach_the_writer"), here("test_bad_output_settings_fail_before_the_models_load")),
    "output.audio": ("tests/test_media_audio.py::test_output_audio_false_drops_the_sound", here("test_bad_output_settings_fail_before_the_models_load")),
    "output.fps": (here("test_output_settings_reach_the_writer"), "tests/test_media_audio.py::test_output_fps_other_than_the_sources_drops_the_sound_and_says_so",
                   here("test_bad_output_settings_fail_before_the_models_load")),
    "controlnet.name": (CN + "test_pipeline_canny_run_counts_controlnet_forwards_and_scale_zero_changes_nothing",
                        CN + "test_named_checkpoints_and_defaults"),
    "controlnet.checkpoint": (CN + "test_controlnet_source_follows_the_model_kind",
                              CN + "test_controlnet_of_the_other_family_is_one_line_before_any_weights",
                              CN + "test_missing_checkpoint_offline_names_the_files_to_fetch"),
    "controlnet.scale": (CN + "test_pipeline_canny_run_counts_controlnet_forwards_and_scale_zero_changes_nothing",
                         "tests/test_controlnet_values.py::test_scale_zero_is_the_edit_without_controlnet_exactly"),
    "controlnet.guidance_start": (CN + "test_pipeline_canny_run_counts_controlnet_forwards_and_scale_zero_changes_nothing",
                                  "tests/test_controlnet_values.py::test_guidance_window_switches_the_controlnet_at_its_steps"),
    "controlnet.guidance_end": (CN + "test_pipeline_frames_run_on_tiny_sd15_with_sdedit",
                                "tests/test_controlnet_values.py::test_guidance_window_switches_the_controlnet_at_its_steps"),
    "controlnet.low_threshold": (CN + "test_canny_conditions_are_the_selected_frames_edges",),
    "controlnet.high_threshold": (CN + "test_canny_conditions_are_the_selected_frames_edges",),
    "controlnet.video": (CN + "test_control_clip_of_the_source_is_selected_and_fitted_like_it",
                         CN + "test_pipeline_frames_run_on_tiny_sd15_with_sdedit",
                         CN + "test_a_control_clip_of_another_count_or_size_is_one_line_before_the_models"),
    "output.reconstruction": ("tests/test_ddpm_run.py::test_reconstruction_is_written_with_its_psnr", "tests/test_ddpm_run.py::test_forwards_counted_as_the_settings_imply"),
    "device": (here("test_device_reaches_the_models"),),
    "dtype": (here("test_dtype_reaches_the_models"),),
    "progress": (here("test_progress_false_prints_no_bar"),),
    "threads": (here("test_threads_hold_for_the_run_and_are_recorded"),),
}

# What a key does, where config.py's own comment beside the field does not say it
ABOUT = {
    "size": "null: the model's native short side; full: the input's size; int: short side; [H, W] (centre-cropped to multiples of 64)",
    "prompt": "the edit's text: conditions the conditional branch",
    "negative_prompt": "conditions the unconditional branch of classifier-free guidance",
    "guidance_scale": "classifier-free guidance scale of the edited branches",
    "model.name": "the preset (architecture, tokenizer rules); set by model=NAME",
    "method.name": "the editing technique: pnp | sdedit (method=NAME)",
    "method.feature_layers": "PnP's residual-feature injection layers (diffusers paths)",
    "controlnet.name": "ControlNet's condition: none, canny (edges of each source frame) or frames (controlnet.video); controlnet=NAME",
    "controlnet.high_threshold": "canny: cv2.Canny's upper hysteresis threshold",
}


def config_leaves() -> list[str]:
    """Every leaf key of the config, both methods' fields under method."""
    def walk(cls, prefix: str) -> list[str]:
        keys = []
        for f in dataclasses.fields(cls):
            sub = {"frames": FramesConfig, "model": ModelConfig, "inversion": InversionConfig,
                   "tokenflow": TokenFlowConfig, "output": OutputConfig, "controlnet": ControlNetConfig}.get(f.name) if cls is RunConfig else None
            if cls is RunConfig and f.name == "method":
                for method in (PnPConfig, SDEditConfig):
                    keys += [k for k in walk(method, "method.") if k not in keys]
            elif sub is not None:
                keys += walk(sub, f"{f.name}.")
            else:
                keys.append(prefix + f.name)
        return keys

    return walk(RunConfig, "")


def field_comments() -> dict[str, str]:
    """{key: the comment beside its field in tokenflow/config.py}."""
    source = (REPO / "tokenflow" / "config.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    lines = source.splitlines()
    sections = {"FramesConfig": "frames.", "ModelConfig": "model.", "PnPConfig": "method.", "SDEditConfig": "method.",
                "InversionConfig": "inversion.", "TokenFlowConfig": "tokenflow.", "OutputConfig": "output.",
                "ControlNetConfig": "controlnet.", "RunConfig": ""}
    comments: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in sections:
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    line = lines[item.lineno - 1]
                    comment = line.split("  # ", 1)[1].strip() if "  # " in line else ""
                    comments.setdefault(sections[node.name] + item.target.id, comment)
    return comments


def render_table() -> str:
    """docs/settings.md: the key -> test table, from KEY_TESTS."""
    comments = field_comments()
    rows = ["# Every setting and the test that guards it", "",
            "Each key of the config (tokenflow/config.py) has a test that fails when the pipeline ignores the key",
            "or wires it to the wrong place. The table is `KEY_TESTS` in tests/test_settings_used.py, rendered by",
            "`python tests/test_settings_used.py > docs/settings.md`; a test there keeps this page equal to it.", "",
            "| key | what it does | tests |", "| --- | --- | --- |"]
    for key in config_leaves():
        about = ABOUT.get(key) or comments.get(key, "")
        tests = "<br>".join(f"`{t}`" for t in KEY_TESTS[key])
        rows.append(f"| `{key}` | {about.replace('|', '/')} | {tests} |")
    return "\n".join(rows) + "\n"


def test_every_key_has_a_test_and_every_named_test_exists():
    leaves = config_leaves()
    assert len(leaves) == len(set(leaves)) > 40
    assert sorted(set(leaves) - set(KEY_TESTS)) == []  # a key nobody guards
    assert sorted(set(KEY_TESTS) - set(leaves)) == []  # a key the config no longer has
    functions: dict[str, set[str]] = {}
    for key, tests in KEY_TESTS.items():
        assert tests, key
        for node_id in tests:
            path, name = node_id.split("::")
            assert "[" not in name, node_id
            if path not in functions:
                tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
                functions[path] = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert name in functions[path], f"{key}: {node_id} does not exist"


def test_docs_table_is_the_tables_rendering():
    assert (REPO / "docs" / "settings.md").read_text(encoding="utf-8") == render_table(), \
        "docs/settings.md is out of date: python tests/test_settings_used.py > docs/settings.md"


# ---------------------------------------------------------------------------------------------
# runs that record what the stages hand each other


FRAMES = 4  # the clip's frames; most runs edit 3 of them


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_sample_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=FRAMES, size=64, fps=15)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One inversion cache for the module's runs: runs that differ only in edit settings invert once."""
    return tmp_path_factory.mktemp("cache")


def settings(clip, cache_dir, *overrides):
    return load_config(["model=tiny", "size=64", "steps=2", "inversion.steps=4", "progress=false", f"video={clip}",
                        "frames.max=3", "output.side_by_side=false", f"inversion.cache_dir={cache_dir}", *overrides])


@dataclasses.dataclass
class Record:
    facts: object = None
    model_args: list = dataclasses.field(default_factory=list)  # (ModelConfig, device, dtype) of build_models
    threads: list = dataclasses.field(default_factory=list)  # torch's CPU threads while the models were built and while decoding
    models: object = None
    ff_chunks: list = dataclasses.field(default_factory=list)  # set_feed_forward_chunk's arguments
    inversion_batches: list = dataclasses.field(default_factory=list)  # UNet forward batch sizes, no control
    edit_batches: list = dataclasses.field(default_factory=list)  # UNet forward batch sizes, with a control
    invert_kwargs: dict = dataclasses.field(default_factory=dict)
    invert_prompt: torch.Tensor = None
    inverted: dict = None  # {t: [n, 4, h, w]} as invert_frames returned it
    loop: dict = dataclasses.field(default_factory=dict)  # edit_video_latents' settings, prompts, clean, timesteps
    steps: list = dataclasses.field(default_factory=list)  # denoise_step: (latents, source, pnp, keyframes)
    joint_frames: list = dataclasses.field(default_factory=list)  # every control's joint_frames
    neighbours: list = dataclasses.field(default_factory=list)  # keyframe_neighbours' (weighting, rule, interval)
    guidance: list = dataclasses.field(default_factory=list)  # classifier_free_guidance's scales
    query_chunks: list = dataclasses.field(default_factory=list)  # the edited branches' attention query_chunk
    decoded: torch.Tensor = None  # the latents the decode stage got
    written: list = dataclasses.field(default_factory=list)  # write_video: (name, fps, crf)
    stderr: str = ""  # what the run printed


def spied_run(cfg: RunConfig, out: Path) -> Record:
    """run_edit(cfg, out), every stage as it is, with what the stages hand each other recorded."""
    rec = Record()
    real = {name: getattr(pipeline, name) for name in ("build_models", "edit_video_latents", "decode_latents")}
    real["invert_frames"] = inversion.invert_frames  # the DDIM inversion, called by inversion.invert_for_run
    real_step, real_neighbours, real_guidance = edit.denoise_step, edit.keyframe_neighbours, edit.classifier_free_guidance
    real_attention, real_write, real_make_control = controls.attention, outputs.write_video, edit.LoopWatch.make_control

    def build_models(model, *, device, dtype):
        rec.model_args.append((model, device, dtype))
        rec.threads.append(torch.get_num_threads())
        models = rec.models = real["build_models"](model, device=device, dtype=dtype)
        set_chunk = models.unet.set_feed_forward_chunk

        def set_feed_forward_chunk(tokens):
            rec.ff_chunks.append(tokens)
            return set_chunk(tokens)

        models.unet.set_feed_forward_chunk = set_feed_forward_chunk

        def see_batch(module, args, kwargs):
            control = args[3] if len(args) > 3 else kwargs.get("control")
            (rec.edit_batches if control is not None else rec.inversion_batches).append(args[0].shape[0])

        models.unet.register_forward_pre_hook(see_batch, with_kwargs=True)
        return models

    def invert_frames(unet, schedule, clean, prompt, **kwargs):
        rec.invert_kwargs, rec.invert_prompt = kwargs, prompt
        rec.inverted = real["invert_frames"](unet, schedule, clean, prompt, **kwargs)
        return rec.inverted

    def edit_video_latents(unet, schedule, settings, prompts, source_latents, clean, timesteps, watch=None, **kwargs):
        rec.loop = dict(settings=settings, prompts=prompts, source_latents=source_latents, clean=clean, timesteps=timesteps,
                        **kwargs)
        return real["edit_video_latents"](unet, schedule, settings, prompts, source_latents, clean, timesteps, watch=watch, **kwargs)

    def denoise_step(unet, schedule, settings, prompts, latents, source, t, t_prev, pnp, keyframes, watch=None, **kwargs):
        rec.steps.append((latents.clone(), source.clone(), pnp, keyframes))
        return real_step(unet, schedule, settings, prompts, latents, source, t, t_prev, pnp, keyframes, watch, **kwargs)

    def keyframe_neighbours(frames, keyframes, weighting, rule, interval):
        rec.neighbours.append((weighting, rule, interval))
        return real_neighbours(frames, keyframes, weighting, rule=rule, interval=interval)

    def classifier_free_guidance(uncond, cond, scale):
        rec.guidance.append(scale)
        return real_guidance(uncond, cond, scale)

    def attention(q, k, v, heads, **kwargs):
        if "joint_frames" in kwargs:  # the edited branches' call (the source's attends per frame)
            rec.query_chunks.append(kwargs.get("query_chunk"))
        return real_attention(q, k, v, heads, **kwargs)

    def make_control(self, frames, **kwargs):
        rec.joint_frames.append(kwargs.get("joint_frames", 1))
        return real_make_control(self, frames, **kwargs)

    def decode_latents(vae, latents, batch_size):
        rec.decoded = latents.clone()
        return real["decode_latents"](vae, latents, batch_size)

    def write_video(path, frames, fps, **kwargs):
        rec.written.append((Path(path).name, fps, kwargs.get("crf")))
        return real_write(path, frames, fps, **kwargs)

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(io.StringIO()) as err:
        for name, fn in [("build_models", build_models), ("edit_video_latents", edit_video_latents),
                         ("decode_latents", decode_latents)]:
            mp.setattr(pipeline, name, fn)
        mp.setattr(inversion, "invert_frames", invert_frames)
        mp.setattr(edit, "denoise_step", denoise_step)
        mp.setattr(edit, "keyframe_neighbours", keyframe_neighbours)
        mp.setattr(edit, "classifier_free_guidance", classifier_free_guidance)
        mp.setattr(edit.LoopWatch, "make_control", make_control)
        mp.setattr(controls, "attention", attention)
        mp.setattr(outputs, "write_video", write_video)
        rec.facts = pipeline.run_edit(cfg, out)
    rec.stderr = err.getvalue()
    return rec


@pytest.fixture(scope="module")
def runs(clip, cache_dir, tmp_path_factory):
    """spied runs by their overrides, each run once for the module."""
    done: dict[tuple[str, ...], Record] = {}

    def run(*overrides: str) -> Record:
        if overrides not in done:
            done[overrides] = spied_run(settings(clip, cache_dir, *overrides), tmp_path_factory.mktemp("run"))
        return done[overrides]

    return run


BASE = ()  # the default run of this module: tokenflow, pnp, 3 frames, 2 steps, device=auto (the CPU)
INTERVAL_2 = ("tokenflow.keyframe_interval=2",)
RICH = ("prompt=a red fox", "negative_prompt=grainy", "inversion_prompt=a dog in the snow", "guidance_scale=3.25", "steps=3",
        "method.qk_fraction=0.7", "method.feature_fraction=0.34", "method.qk_layers=[up_blocks.2.attentions.1]",
        "method.feature_layers=[up_blocks.2.resnets.0]")


def text(models, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return models.text_encoder(models.tokenizer([prompt]))


# ---------------------------------------------------------------------------------------------
# the input: video, frames.*, size, model.native_size


@pytest.mark.parametrize("overrides,indices", [
    ([], [0, 1, 2, 3, 4, 5, 6]),
    (["frames.start=2"], [2, 3, 4, 5, 6]),
    (["frames.end=4"], [0, 1, 2, 3]),
    (["frames.stride=3"], [0, 3, 6]),
    (["frames.max=2"], [0, 1]),
    (["frames.start=1", "frames.end=6", "frames.stride=2", "frames.max=2"], [1, 3]),
])
def test_frame_selection_reaches_the_reader(tmp_path, overrides, indices):
    clip = make_sample_clip(tmp_path / "seven.mp4", frames=7, size=64, fps=15)
    video = load_video(load_config(["model=tiny", "size=64", f"video={clip}", *overrides]))
    assert list(video.indices) == indices and video.num_frames == len(indices)


@pytest.mark.parametrize("overrides,size", [
    (["size=128"], (128, 128)),  # an int: the short side
    (["size=[64,128]"], (64, 128)),
    (["size=full"], (64, 64)),  # the input's own
    (["model.native_size=64"], (64, 64)),  # size=null: the model's native short side
    (["model.native_size=128"], (128, 128)),
    (["size=64", "model.native_size=128"], (64, 64)),  # a size given wins over the native size
])
def test_size_and_native_size_reach_the_reader(clip, overrides, size):
    video = load_video(load_config(["model=tiny", f"video={clip}", "frames.max=1", *overrides]))
    assert (video.height, video.width) == size


def test_folder_fps_is_an_image_folders_rate_and_said(tmp_path, clip):
    from tokenflow.config import ConfigError
    from tokenflow.media import write_png_frames

    folder = tmp_path / "frames"
    write_png_frames(folder, torch.zeros(3, 64, 64, 3, dtype=torch.uint8))
    default = load_video(load_config(["model=tiny", "size=64", f"video={folder}"]))
    assert default.fps == 20 and default.notes[0] == (f"{folder} is a folder of images, which carry no frame rate: "
                                                      "read at 20 fps (frames.folder_fps=N sets another)")
    slow = load_video(load_config(["model=tiny", "size=64", f"video={folder}", "frames.folder_fps=12.5"]))
    assert slow.fps == 12.5 and "read at 12.5 fps" in slow.notes[0]
    a_file = load_video(load_config(["model=tiny", "size=64", f"video={clip}", "frames.folder_fps=12.5"]))
    assert a_file.fps == 15 and not any("folder" in n for n in a_file.notes)  # a video file keeps its own rate
    with pytest.raises(ConfigError, match="frames.folder_fps"):
        load_config(["model=tiny", "frames.folder_fps=0"])


# ---------------------------------------------------------------------------------------------
# models: device, dtype, model.*


def test_model_settings_reach_build_models(monkeypatch, clip, tmp_path):
    """build_models hands a preset's source, variant and prediction type to the loader (a hub id
    here: the loader is replaced, nothing is read), and the run hands build_models its model settings."""
    from tokenflow.models import build as build_module
    from tokenflow.models.build import build_models

    seen = {}

    def load_models(source, **kwargs):
        seen.update(kwargs, source=source)
        raise RuntimeError("loader reached")

    monkeypatch.setattr(build_module, "load_models", load_models)
    cfg = load_config(["model=sd15", "model.source=someone/some-sd15", "model.variant=fp16", "model.prediction_type=v_prediction"])
    with pytest.raises(RuntimeError, match="loader reached"):
        build_models(cfg.model, device="cpu", dtype=torch.float16)
    assert seen["source"] == "someone/some-sd15" and seen["variant"] == "fp16" and seen["prediction_type"] == "v_prediction"
    assert seen["expect"].name == "sd15" and seen["dtype"] == torch.float16 and seen["device"] == "cpu"
    # the run: its model settings, as given, to build_models
    asked = []

    def no_models(model, *, device, dtype):
        asked.append(model)
        raise RuntimeError("models asked for")

    monkeypatch.setattr(pipeline, "build_models", no_models)
    run = settings(clip, tmp_path / "cache", "model.seed=5", "model.variant=fp16")
    with pytest.raises(RuntimeError, match="models asked for"):
        pipeline.run_edit(run, tmp_path / "run")
    assert asked == [run.model]


def test_device_reaches_the_models(runs, monkeypatch, clip, cache_dir, tmp_path):
    rec = runs("device=cpu", "progress=true")
    assert rec.model_args[0][1] == "cpu" and next(rec.models.unet.parameters()).device.type == "cpu"
    assert rec.facts.device == "cpu"
    # a device this machine lacks is refused, naming it, before any model is built (not run on the CPU instead)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(pipeline, "build_models", lambda *a, **k: pytest.fail("models built for a device that is not there"))
    with pytest.raises(DeviceError, match="device=cuda:1"):
        pipeline.run_edit(settings(clip, cache_dir, "device=cuda:1"), tmp_path / "run")


def test_threads_hold_for_the_run_and_are_recorded(runs, clip, cache_dir, tmp_path):
    from tokenflow.config import ConfigError

    before = torch.get_num_threads()
    other = 2 if before != 2 else 3
    rec = runs(f"threads={other}")
    assert rec.threads == [other] and rec.facts.threads == other
    assert json.loads((Path(rec.facts.outputs["edited"]).parent / "run.json").read_text())["threads"] == other
    assert torch.get_num_threads() == before  # put back once the run ends
    base = runs(*BASE)  # threads=null: torch's own setting, untouched, and recorded
    assert base.threads == [before] and base.facts.threads == before
    with pytest.raises(ConfigError, match="threads must be an integer >= 1 or null"):
        load_config(["model=tiny", "threads=0"])


def test_dtype_reaches_the_models(runs):
    rec = runs("dtype=bfloat16")
    assert rec.model_args[0][2] == torch.bfloat16
    assert {p.dtype for p in rec.models.unet.parameters()} == {torch.bfloat16}
    assert next(rec.models.vae.parameters()).dtype == torch.bfloat16 and rec.facts.dtype == "bfloat16"
    assert next(runs(*BASE).models.unet.parameters()).dtype == torch.float32  # auto on the CPU


# ---------------------------------------------------------------------------------------------
# prompts, guidance, steps, the start of the edit


def test_each_prompt_conditions_its_own_branch(runs):
    rec = runs(*RICH)
    prompts, models = rec.loop["prompts"], rec.models
    assert torch.equal(prompts.target, text(models, "a red fox"))
    assert torch.equal(prompts.negative, text(models, "grainy"))
    assert torch.equal(prompts.source, text(models, "a dog in the snow"))
    assert torch.equal(rec.invert_prompt, prompts.source)  # the inversion is conditioned on the inversion prompt


def test_guidance_scale_reaches_the_guidance(runs):
    rec = runs(*RICH)
    assert rec.guidance and set(rec.guidance) == {3.25}


def test_steps_are_the_denoising_steps_run(runs):
    rec = runs(*RICH)
    assert len(rec.facts.timesteps) == len(rec.steps) == 3
    assert rec.facts.timesteps == rec.models.config.schedule.timesteps(3).tolist()
    assert len(runs(*BASE).steps) == 2


def test_pnp_starts_from_the_inverted_latents(runs):
    """PnP's first step starts from the source's inverted x_T (not noise, not the clean latents),
    and every step's source branch is the inversion at that step."""
    rec = runs(*BASE)
    ts = rec.loop["timesteps"]
    x_T = rec.inverted[ts[0]]
    first_latents, first_source, _, _ = rec.steps[0]
    assert torch.equal(first_latents, x_T.to(first_latents))
    assert not torch.allclose(first_latents, rec.loop["clean"], atol=1e-2)
    for (_, source, _, _), t in zip(rec.steps, ts):
        assert torch.equal(source, rec.inverted[t].to(source))


def test_pnp_injection_follows_its_fractions_and_layers(runs):
    """3 steps: q/k for the first 70% (steps 0, 1), residual features for the first 34% (step 0),
    each in the layers given (the defaults, 50% and 80%, would inject q/k in step 0 and features in 0-1)."""
    rec = runs(*RICH)
    qk = [pnp.qk_layers for _, _, pnp, _ in rec.steps]
    features = [pnp.feature_layers for _, _, pnp, _ in rec.steps]
    assert qk == [("up_blocks.2.attentions.1",), ("up_blocks.2.attentions.1",), ()]
    assert features == [("up_blocks.2.resnets.0",), (), ()]


@pytest.mark.parametrize("strength,steps,steps_run", [(0.25, 4, 1), (1.0, 2, 2)])  # the default 0.6: 2 of 4, 1 of 2
def test_sdedit_runs_its_strength_of_the_steps_without_injection(runs, strength, steps, steps_run):
    rec = runs("method=sdedit", f"method.strength={strength}", f"steps={steps}")
    assert len(rec.steps) == len(rec.facts.timesteps) == steps_run  # int(steps * strength) of the steps
    assert all(pnp.qk_layers == () and pnp.feature_layers == () for _, _, pnp, _ in rec.steps)
    ts = rec.models.config.schedule.timesteps(steps).tolist()
    assert rec.facts.timesteps == ts[steps - steps_run:]
    start = rec.steps[0][0]
    assert not torch.equal(start, rec.inverted[ts[steps - steps_run]].to(start))  # the noised clean latents, not x_t


# ---------------------------------------------------------------------------------------------
# keyframes: seed, keyframe_interval, mode


def test_seed_changes_the_keyframes(runs):
    a, b = runs(*INTERVAL_2), runs(*INTERVAL_2, "seed=2")  # seeds 0 and 2 draw [0, 2], [1, 2] and [0, 2], [0, 2]
    assert a.loop["settings"].seed == 0 and b.loop["settings"].seed == 2
    assert a.facts.keyframes_per_step != b.facts.keyframes_per_step
    assert b.facts.keyframes_per_step == [keyframes_at(b.loop["settings"], 3, s) for s in range(2)]


def test_keyframe_interval_reaches_the_draw(runs):
    rec = runs(*INTERVAL_2)
    assert rec.loop["settings"].keyframe_interval == 2
    for keyframes in rec.facts.keyframes_per_step:  # intervals [0, 2) and [2, 3) of the 3 frames
        assert len(keyframes) == 2 and keyframes[0] in (0, 1) and keyframes[1] == 2
    assert {(w, r, i) for w, r, i in rec.neighbours} == {("sigmoid", "paper", 2)}
    assert all(len(k) == 1 for k in runs(*BASE).facts.keyframes_per_step)  # interval 8: one keyframe


@pytest.mark.parametrize("n,interval", [(7, 3), (16, 8), (5, 2)])
def test_every_position_of_a_keyframe_interval_can_be_drawn(n, interval):
    """Over steps and seeds, every frame of every interval (the last, shorter one too) is drawn:
    an off-by-one (never the interval's last frame) or a fixed offset fails."""
    drawn: dict[int, set[int]] = {}
    for seed in range(3):
        s = EditSettings(keyframe_interval=interval, seed=seed)
        for step in range(60):
            keyframes = keyframes_at(s, n, step)
            assert len(keyframes) == -(-n // interval)
            for start, k in zip(range(0, n, interval), keyframes):
                assert start <= k < min(start + interval, n)
                drawn.setdefault(start, set()).add(k)
    assert drawn == {start: set(range(start, min(start + interval, n))) for start in range(0, n, interval)}


@pytest.mark.parametrize("mode", ["tokenflow", "fixed_keyframes", "per_frame", "extended_all", "reconstruction"])
def test_mode_reaches_the_loop(runs, mode):
    rec = runs(*INTERVAL_2, *([f"tokenflow.mode={mode}"] if mode != "tokenflow" else []))
    n = 3
    if mode == "reconstruction":  # encode and decode only: no inversion, no loop
        assert rec.loop == {} and rec.inverted is None and rec.facts.timesteps == []
        assert rec.decoded is not None and rec.edit_batches == []
        return
    assert rec.loop["settings"].mode == mode
    keyframes = [k for _, _, _, k in rec.steps]
    if mode == "tokenflow":
        assert all(k is not None and len(k) == 2 for k in keyframes) and 1 in rec.joint_frames  # propagation pass
    elif mode == "fixed_keyframes":
        assert keyframes == [fixed_keyframes(n, 2)] * 2
    elif mode == "per_frame":
        assert keyframes == [None, None] and set(rec.joint_frames) == {1}
    else:  # extended_all: one joint pass over every frame
        assert keyframes == [None, None] and set(rec.joint_frames) == {n}


def test_propagation_rule_and_weighting_reach_the_neighbours(runs):
    rec = runs("tokenflow.propagation=released", "tokenflow.weighting=linear", "tokenflow.keyframe_interval=2")
    assert rec.neighbours and set(rec.neighbours) == {("linear", "released", 2)}
    assert set(runs(*BASE).neighbours) == {("sigmoid", "paper", 8)}


def test_reuse_keyframes_reaches_the_loop(runs):
    """The paper's rule takes a keyframe's step from the keyframe pass (n frame forwards a step);
    reuse_keyframes=false runs it through the propagation pass too (n + K)."""
    full = runs("tokenflow.reuse_keyframes=false")
    keyframes = sum(len(k) for k in full.facts.keyframes_per_step)
    assert full.facts.unet_frame_forwards == 3 * 2 + keyframes
    assert runs(*BASE).facts.unet_frame_forwards == 3 * 2


# ---------------------------------------------------------------------------------------------
# memory-only settings: they reach the forwards and change the edit by float rounding at most


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to float rounding: other batch or chunk shapes take other BLAS paths, and the inversion's
    differences grow through the steps (measured here: up to 4e-5 of latents of scale 1)."""
    return (a - b).abs().max().item() <= 2e-4 * max(1.0, b.abs().max().item())


def test_tokenflow_batch_size_changes_the_forward_batches_not_the_edit(runs):
    one, base = runs("tokenflow.batch_size=1"), runs(*BASE)
    # 3 branches x frames: the keyframe pass (1 keyframe) and propagation batches of 1 (of 2 frames with 8)
    assert set(one.edit_batches) == {3} and 6 in base.edit_batches
    assert close(one.decoded, base.decoded)


def test_inversion_batch_size_is_the_inversions_forward_batch(runs):
    two, base = runs("inversion.batch_size=2", "inversion.cache=false"), runs("inversion.cache=false")
    assert sorted(set(two.inversion_batches)) == [1, 2] and set(base.inversion_batches) == {3}
    assert two.invert_kwargs["batch_size"] == 2
    assert close(two.decoded, base.decoded)


def test_query_chunk_reaches_the_attention_and_changes_nothing(runs):
    chunked, base = runs("tokenflow.query_chunk=5"), runs(*BASE)
    assert chunked.query_chunks and set(chunked.query_chunks) == {5} and set(base.query_chunks) == {None}
    assert close(chunked.decoded, base.decoded)


def test_ff_chunk_reaches_the_unet_and_changes_nothing(runs):
    from unet.model import FeedForward

    chunked, whole = runs("tokenflow.ff_chunk=7"), runs(*BASE)  # 16384 tokens: the tiny run's forwards whole
    assert chunked.ff_chunks == [7] and whole.ff_chunks == [16384]
    assert {m.chunk for m in chunked.models.unet.modules() if isinstance(m, FeedForward)} == {7}
    assert close(chunked.decoded, whole.decoded)


# ---------------------------------------------------------------------------------------------
# the inversion cache: reused for the same inversion only


@pytest.fixture(scope="module")
def cached(clip, tmp_path_factory):
    """A cache holding the inversion of the clip's first frame under this module's base settings."""
    cache = tmp_path_factory.mktemp("inversions")
    rec = spied_run(settings(clip, cache, "frames.max=1"), tmp_path_factory.mktemp("first"))
    assert rec.facts.inversion_frames_reused == 0
    return cache, rec


@pytest.mark.parametrize("override,reused", [
    (None, 1),  # the same inversion
    ("prompt=a marble statue,guidance_scale=2,seed=4,tokenflow.mode=per_frame", 1),  # edit settings leave it as it is
    ("inversion.steps=5", 0),
    ("inversion_prompt=a dog in the snow", 0),
    ("model.seed=1", 0),  # other random weights
])
def test_inversion_cache_is_reused_only_for_the_same_inversion(clip, cached, tmp_path, override, reused):
    cache, first = cached
    rec = spied_run(settings(clip, cache, "frames.max=1", *(override.split(",") if override else [])), tmp_path / "run")
    assert rec.facts.inversion_frames_reused == reused
    t = rec.loop["timesteps"][0]
    same = torch.equal(rec.inverted[t], first.inverted[t])
    assert same == bool(reused)  # an inversion that differs was computed, not loaded
    if override == "inversion.steps=5":
        assert rec.invert_kwargs["inversion_steps"] == 5
    if override and override.startswith("inversion_prompt"):
        assert torch.equal(rec.invert_prompt, text(rec.models, "a dog in the snow"))


def test_inversion_cache_false_and_cache_dir(runs, cache_dir):
    off = runs("inversion.cache=false")
    assert off.facts.inversion_cache is None and off.invert_kwargs["cache"] is None
    on = runs(*BASE)
    assert Path(on.facts.inversion_cache).parent == cache_dir and any(Path(on.facts.inversion_cache).glob("frame_*.safetensors"))


# ---------------------------------------------------------------------------------------------
# outputs and progress


def test_output_settings_reach_the_writer(runs):
    rec = runs("output.side_by_side=true", "output.png_frames=true", "output.crf=40", "output.fps=24")
    assert sorted(name for name, _, _ in rec.written) == ["edited.mp4", "side_by_side.mp4"]
    assert {(fps, crf) for _, fps, crf in rec.written} == {(24, 40)}
    out = Path(rec.facts.outputs["edited"]).parent
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert rec.facts.fps == 24.0
    base = runs(*BASE)  # this module's runs: side_by_side=false, png_frames=false, crf 18, the source's fps
    assert [name for name, _, _ in base.written] == ["edited.mp4"] and base.written[0][1:] == (15, 18)
    assert "png_frames" not in base.facts.outputs


@pytest.mark.parametrize("override", [
    "output.side_by_side=2", "output.png_frames=maybe", "output.crf=60", "output.crf=1.5", "output.audio=yes",
    "output.fps=0", "output.fps=-5",
    "output.fps=0.0001",  # > 0, but no video can be written at it: must fail here, not after the edit
])
def test_bad_output_settings_fail_before_the_models_load(clip, tmp_path, monkeypatch, override):
    monkeypatch.setattr(pipeline, "build_models", lambda *a, **k: pytest.fail(f"models loaded for a run with {override}"))
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        pipeline.run_edit(settings(clip, tmp_path / "cache", override), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_progress_false_prints_no_bar(runs):
    quiet, bars = runs(*BASE).stderr, runs("device=cpu", "progress=true").stderr
    for bar in ("inversion, 3 frames x 3 steps", "editing (tokenflow, pnp), 3 frames x 2 steps"):
        assert bar + ":" in bars and bar + ":" not in quiet
    assert "frame-step/s" in bars and "frame/s" not in bars  # the unit is what is counted: one frame through one step
    assert "reusing cached inversion" in quiet or "inverted latents cached" in quiet  # the lines that are not bars stay


if __name__ == "__main__":
    sys.stdout.write(render_table())
