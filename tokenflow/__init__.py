"""TokenFlow on a hand-written Stable Diffusion 2.1.

`load_models` is imported lazily so `import tokenflow` stays cheap (the CLI, tools and tests import
this package for small helpers too).
"""


def load_models(source=None, *, dtype=None, device="cpu", variant=None, prediction_type=None):
    """Load UNet, VAE, text encoder, tokenizer and config; see `tokenflow.models.loading.load_models`."""
    from .models.loading import load_models as _load_models

    return _load_models(source, dtype=dtype, device=device, variant=variant, prediction_type=prediction_type)
