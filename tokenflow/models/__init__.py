"""Model loading: the files a Stable Diffusion checkpoint comes as, read into the hand-written models.

- `checkpoint.py`: safetensors reading, strict filling of a model built on the meta device, and
  `CheckpointError`, the error the model packages (unet/, vae/, clip_text/) share for bad files;
- `loading.py`: `load_models(source)` for a hub id, a diffusers folder or one ldm file, the model
  kind (SD-1.5, SD-2.x) read from the files;
- `tiny.py`: random-weight tiny models of each kind, for runs without weights.
"""

# model.source values that build a random-weight tiny model instead of loading one (see tiny.py):
# SD-2.x-shaped and SD-1.5-shaped.
TINY_SOURCES = ("tiny", "tiny_sd15")
