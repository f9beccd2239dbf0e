"""The models a run uses: the registry of presets, and building them (random, or read from files).

- `presets.py`: the registry: every preset (`model=NAME`) and the checkpoint kinds (SD-1.x, SD-2.x);
- `build.py`: `build_models(model_config, device=, dtype=)`, the one entry a run calls;
- `loading.py`: `load_models(source)`, a hub id, a diffusers folder or one ldm file read as one walk
  down (find the files, read the headers, build the config, fill strictly);
- `random_weights.py`: `build_random(preset, seed)`, a preset's architecture with seeded random weights;
- `checkpoint.py`: safetensors reading, strict filling, and `CheckpointError`, the error the model
  packages (unet/, vae/, clip_text/) share for bad files;
- `bundle.py`: `Models` (UNet, VAE, text encoder, tokenizer) and `ModelFacts` (where they came from).

The names below are imported on first use, so `import tokenflow.models.checkpoint` stays light.
"""

_LAZY = {
    "build_models": "build", "load_models": "loading", "build_random": "random_weights",
    "Models": "bundle", "ModelFacts": "bundle", "PRESETS": "presets", "preset": "presets", "RANDOM": "presets",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
