"""matplotlib for the project's figures, drawn off-screen (Agg) where there is no
display, so tools and CI need none.

matplotlib is an optional extra (`pip install -e ".[docs]"`), not a core dependency: the editing
pipeline never draws. The tools that do import `plt` from here and get one clear error without it.
"""

from __future__ import annotations

try:
    import matplotlib
    import matplotlib.pyplot as plt  # without a display matplotlib picks Agg itself; a notebook keeps inline
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the figures need matplotlib, an optional extra: pip install -e \".[docs]\" (or pip install matplotlib)"
    ) from err

__all__ = ["matplotlib", "plt"]
