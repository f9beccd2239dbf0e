"""The walkthrough notebook (docs/walkthrough.ipynb) runs top to bottom on the CPU without weights,
is kept in the repository without outputs, and its command leaves the executed copy to open."""

import os
import sys
import tempfile
from pathlib import Path

import nbformat  # the docs extra (tests/run.sh installs it)

from tools import run_walkthrough

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "docs" / "walkthrough.ipynb"


def stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the walkthrough has no code"
    assert all(not c.outputs and c.execution_count is None for c in code), "strip the outputs before committing"


def test_walkthrough_command_leaves_the_executed_notebook_with_its_plots(tmp_path, capfd):
    """`python -m tools.run_walkthrough` (the docs' command) runs every cell (nbclient raises
    CellExecutionError, naming the cell, when one raises) and writes the executed notebook, plots
    included, into its folder, with the files the notebook makes, and nothing into a temporary folder.
    The demo section shows the propagated edit flickering less than the per-frame edit."""
    out = tmp_path / "walkthrough"
    temp_before = set(Path(tempfile.gettempdir()).glob("tokenflow_walkthrough_*"))
    assert run_walkthrough.main(["--out-dir", str(out)]) == 0
    printed = capfd.readouterr()  # the kernel's own stderr included (a subprocess writes to the file descriptor)
    assert f"wrote {out / NOTEBOOK.name}" in printed.out
    assert "WARNING" not in printed.err and "Traceback" not in printed.err, printed.err
    nb = nbformat.read(out / NOTEBOOK.name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "a cell did not run"
    plots = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(plots) >= 5, f"{len(plots)} plots in the executed notebook"
    text = "\n".join(stream_text(c) for c in code)
    assert "notebook executed in" in text
    assert f"| outputs: {out}" in text  # the notebook's own files went to the command's folder
    errors = {}
    for line in text.splitlines():  # "warp error <name>: <value> x1e-3" from tools.toy_propagation.report
        if line.startswith("warp error") and line.endswith("x1e-3"):
            name, value = line[len("warp error"):].split(":")
            errors[name.strip()] = float(value.split()[0])
    assert set(errors) == {"source", "per_frame", "tokenflow_paper", "tokenflow_released"}, text
    assert errors["source"] < errors["tokenflow_paper"] < errors["per_frame"], errors
    assert (out / "toy_propagation" / "nn_field.png").is_file()
    assert "max |attention(joint_frames=3) - Eq. 3-4| =" in text
    assert set(Path(tempfile.gettempdir()).glob("tokenflow_walkthrough_*")) == temp_before
    assert "TOKENFLOW_WALKTHROUGH_OUT" not in os.environ  # the command's setting does not outlive it


def test_walkthrough_runs_on_this_pythons_kernel():
    """The kernel is ipykernel on the interpreter running the command (the one with this project and
    the docs extra), not whatever another environment's "python3" kernel spec names."""
    spec = run_walkthrough.this_python_kernel().kernel_spec
    assert spec.argv[:3] == [sys.executable, "-m", "ipykernel_launcher"]


def test_docs_give_the_walkthrough_command():
    for page in (REPO / "docs" / "learn.md", REPO / "README.md"):
        assert "python -m tools.run_walkthrough" in page.read_text(), page
    assert "jupyter execute" not in (REPO / "docs" / "learn.md").read_text()
