"""Run the walkthrough notebook (docs/walkthrough.ipynb) top to bottom and keep it with its outputs.

    python -m tools.run_walkthrough                       # -> outputs/walkthrough/walkthrough.ipynb
    python -m tools.run_walkthrough --out-dir DIR

The executed copy, every plot and printed number in it, is written to the output folder, together
with what the notebook itself writes (the demo's videos and nn_field.png, the tiny edits); open it in
Jupyter, VS Code or any notebook viewer. The notebook in docs/ stays as committed, without outputs.

The cells run on a kernel of the Python that runs this command (ipykernel, from the `docs` extra), so
they import this checkout's code whatever other kernels Jupyter knows. Nothing is written outside the
output folder. A cell that fails stops the run; the notebook is still written, up to and including
the failed cell with its traceback, and the command exits with code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "docs" / "walkthrough.ipynb"
DEFAULT_OUT = "outputs/walkthrough"
CELL_TIMEOUT_S = 1200  # the slowest cell takes about a minute on two cores


def this_python_kernel():
    """A KernelManager that starts ipykernel on this interpreter (sys.executable), not whatever a
    "python3" kernel spec on this machine points at (another environment, without this project)."""
    from ipykernel.kernelspec import get_kernel_dict
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import KernelManager

    class ThisPython(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return KernelSpec(resource_dir="", name=kernel_name, **get_kernel_dict())

    km = KernelManager(kernel_name="python3", kernel_spec_manager=ThisPython())
    if "transport_encryption" in km.trait_names() and zmq_has_curve():
        km.transport_encryption = "auto"  # keys for the kernel's sockets, so it does not warn of plain-text TCP
    return km


def zmq_has_curve() -> bool:
    import zmq

    return bool(zmq.has("curve"))


def run_walkthrough(out_dir: Path | str, notebook: Path = NOTEBOOK) -> Path:
    """Execute `notebook` with its outputs going to `out_dir`, and write the executed copy there ->
    its path. Raises nbclient's CellExecutionError (naming the cell) after writing the copy."""
    import nbformat
    from nbclient import NotebookClient

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(notebook, as_version=4)
    target = out_dir / notebook.name
    # the kernel inherits the environment: the notebook's files land in out_dir; jupyter_core's
    # platform paths are asked for, so no deprecation warning about them reaches the user
    env = {"TOKENFLOW_WALKTHROUGH_OUT": str(out_dir), "JUPYTER_PLATFORM_DIRS": os.environ.get("JUPYTER_PLATFORM_DIRS", "1")}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # started in docs/, as Jupyter does when the notebook is opened there
    km = this_python_kernel()
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(notebook.parent)}})
    try:
        client.execute()
    finally:
        if km.has_kernel:  # nbclient leaves a kernel it was given running: stopped here, before this process ends
            km.shutdown_kernel()
        nbformat.write(nb, target)  # on failure too: the traceback is in the failed cell's output
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.run_walkthrough", allow_abbrev=False,
                                     description="Run docs/walkthrough.ipynb top to bottom (a few minutes on a CPU, no "
                                                 "weights) and write the executed notebook, with its plots, to a folder.")
    parser.add_argument("--out-dir", default=DEFAULT_OUT,
                        help=f"where the executed notebook and the files it writes go (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        import nbclient  # noqa: F401
        import ipykernel  # noqa: F401
    except ImportError as e:
        print(f"error: {e.name} is missing: install the docs extra (pip install -e \".[docs]\")", file=sys.stderr)
        return 2
    from nbclient.exceptions import CellExecutionError

    print(f"running {NOTEBOOK.relative_to(REPO)} (a few minutes) ...", file=sys.stderr, flush=True)
    try:
        path = run_walkthrough(args.out_dir)
    except CellExecutionError as e:
        failed = Path(args.out_dir).resolve() / NOTEBOOK.name
        print(f"error: a cell failed; {failed} shows it with its traceback:\n{str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    print(f"wrote {path}: the walkthrough with its plots and numbers; open it in Jupyter, VS Code or any notebook viewer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
