"""tools.maintainers.bench at the tiny config, one repeat: the rows and columns of the report, ratios that are
positive finite numbers, ours agreeing with the reference (and the check noticing when it does not),
the end-to-end timings read from run.json, and clear errors. No timing assertions."""

import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tools.maintainers.bench import bench_model, describe_machine, main, make_cases, markdown_report, run_e2e, time_case, unet_pair

COLUMNS = ["model", "config", "device", "dtype", "batch", "inputs", "ours s", "reference s", "time ratio",
           "ours peak MiB", "reference peak MiB", "memory ratio", "max abs diff (ref max)"]


@pytest.fixture(scope="module")
def rows():
    # batch 8 so even the tiny text encoder's activations are blocks malloc maps (> 64 KiB): the
    # fresh-process RSS peaks are then real numbers, not allocator noise
    out = []
    for model in ("unet", "vae", "text"):
        out += bench_model(model, "tiny", "float32", "cpu", batch=8, latent=8, repeats=1, warmup=0)
    return out


def positive_finite(x) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def test_one_row_per_forward_with_the_settings(rows):
    assert [r.model for r in rows] == ["unet", "vae.encode", "vae.decode", "text"]
    assert all((r.config, r.device, r.dtype, r.batch) == ("tiny", "cpu", "float32", 8) for r in rows)
    assert rows[0].inputs == "x [8,4,8,8] ctx [8,77,64]"
    assert rows[1].inputs == "images [8,3,64,64]" and rows[2].inputs == "latents [8,4,8,8]"
    assert rows[3].inputs == "ids [8,77]"
    assert all(len(r.ours_runs_s) == len(r.reference_runs_s) == 1 for r in rows)


def test_ratios_are_positive_finite_and_outputs_agree(rows):
    for r in rows:
        for name in ("ours_s", "reference_s", "time_ratio", "ours_peak_mib", "reference_peak_mib", "memory_ratio"):
            assert positive_finite(getattr(r, name)), (r.model, name, getattr(r, name))
        assert r.time_ratio == pytest.approx(r.ours_s / r.reference_s)
        assert r.memory_ratio == pytest.approx(r.ours_peak_mib / r.reference_peak_mib)
        assert r.max_abs_diff < 1e-4, r.model
        assert r.reference_abs_max > 0.01  # a real output, not zeros that agree trivially


def test_markdown_table_has_the_columns_and_rows(rows):
    report = markdown_report(describe_machine("cpu"), rows)
    assert "- cpu: " in report and f"- torch: {torch.__version__}" in report and "- threads: " in report
    table = [line for line in report.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == COLUMNS
    body = [[c.strip() for c in line.strip("|").split("|")] for line in table[1:]]
    assert [b[0] for b in body] == ["unet", "vae.encode", "vae.decode", "text"]
    for b in body:
        assert len(b) == len(COLUMNS)
        for col in ("ours s", "reference s", "time ratio", "memory ratio"):
            assert positive_finite(float(b[COLUMNS.index(col)]))


def test_reduced_precision_rows_run_and_agree():
    """The GPU rows are float16/bfloat16; here the same path on the CPU (bfloat16: the CPU's fast
    half type), both sides in that dtype, sharing the weights cast once."""
    rows = []
    for model in ("unet", "text"):
        rows += bench_model(model, "tiny", "bfloat16", "cpu", batch=1, latent=8, repeats=1, warmup=0, memory=False)
    assert [(r.model, r.dtype) for r in rows] == [("unet", "bfloat16"), ("text", "bfloat16")]
    for r in rows:
        assert positive_finite(r.time_ratio) and r.memory_ratio is None
        assert r.max_abs_diff < 1e-2 and r.reference_abs_max > 0.01, r.model


def test_agreement_check_sees_a_different_model():
    pair = unet_pair("tiny", torch.float32, "cpu")
    # a new tensor, not an in-place change: the two models share their weights
    bias = pair.ours.conv_out.bias
    pair.ours.conv_out.bias = torch.nn.Parameter(bias + 1.0, requires_grad=False)
    (case,) = make_cases("unet", pair, 1, 8, torch.float32, "cpu")
    timing = time_case(case, repeats=1, warmup=0, device="cpu")
    assert timing.max_abs_diff == pytest.approx(1.0, abs=1e-4)


def test_end_to_end_reads_seconds_per_frame_from_run_json():
    e2e = run_e2e(frames=3, size=64, extra_overrides=("steps=2", "inversion.steps=4"))
    assert e2e["frames"] == 3 and e2e["size"] == [64, 64] and (e2e["steps"], e2e["inversion_steps"]) == (2, 4)
    assert set(e2e["seconds_per_frame"]) == {"encode", "inversion", "editing", "decode"}
    assert all(positive_finite(v) for v in e2e["seconds_per_frame"].values())
    for stage, per in e2e["seconds_per_frame"].items():
        assert per == pytest.approx(e2e["timings_s"][stage] / 3, abs=1e-3)
    report = markdown_report(describe_machine("cpu"), [], e2e)
    assert "## End to end (tiny model, 3 frames at 64x64, 2 steps, 4 inversion steps, cpu float32)" in report
    assert "| inversion | " in report and "| editing | " in report and "| total | " in report


def test_cli_writes_the_markdown(tmp_path, capsys):
    out = tmp_path / "bench.md"
    assert main(["--parts", "text", "--model", "tiny", "--repeats", "1", "--warmup", "0", "--no-memory",
                 "--batch", "2", "--markdown", str(out), "--json", str(tmp_path / "bench.json")]) == 0
    text = out.read_text()
    assert "| text | tiny | cpu | float32 | 2 | ids [2,77] |" in text
    assert text in capsys.readouterr().out
    assert "load_average_1m_after" in (tmp_path / "bench.json").read_text()


def test_bad_input_is_named(capsys):
    with pytest.raises(ValueError, match="unknown model 'clip'"):
        bench_model("clip", "tiny")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        bench_model("unet", "tiny", dtype="float8")
    with pytest.raises(SystemExit):
        main(["--parts", "unet,clip"])
    assert "unknown part clip; choose from unet, vae, text" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--dtype", "half"])
    assert "unknown dtype half" in capsys.readouterr().err


def test_controlnet_row_compares_with_diffusers_controlnet():
    (row,) = bench_model("controlnet", "tiny", "float32", "cpu", batch=2, latent=8, repeats=1, warmup=0, memory=False)
    assert row.model == "controlnet" and row.inputs == "x [2,4,8,8] ctx [2,77,64] cond [2,3,64,64]"
    assert positive_finite(row.time_ratio)
    assert row.max_abs_diff < 1e-4 and row.reference_abs_max > 0.01


def test_end_to_end_with_controlnet_counts_its_forwards():
    e2e = run_e2e(frames=3, size=64, extra_overrides=("steps=2", "inversion.steps=4", "controlnet=canny"))
    assert e2e["controlnet"]["condition"] == "canny"
    assert e2e["controlnet_frame_forwards"] == e2e["unet_frame_forwards"] > 0
    report = markdown_report(describe_machine("cpu"), [], e2e)
    assert (f"ControlNet canny: {e2e['controlnet_frame_forwards']} ControlNet frame-forwards beside "
            f"{e2e['unet_frame_forwards']} UNet ones)") in report
