"""TokenFlow (Geyer et al. 2024) on hand-written Stable Diffusion models (the presets of
tokenflow.models.presets).

`load_models` and `build_models` are imported lazily so `import tokenflow` stays cheap (the CLI,
tools and tests import this package for small helpers too).
"""


def load_models(source=None, *, dtype=None, device="cpu", variant=None, prediction_type=None):
    """Load UNet, VAE, text encoder, tokenizer and facts; see `tokenflow.models.loading.load_models`."""
    from .models.loading import load_models as _load_models

    return _load_models(source, dtype=dtype, device=device, variant=variant, prediction_type=prediction_type)


def build_models(model, *, device, dtype):
    """The models a `model` config names, random or from files; see `tokenflow.models.build.build_models`."""
    from .models.build import build_models as _build_models

    return _build_models(model, device=device, dtype=dtype)
