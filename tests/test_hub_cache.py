"""load_models with a hub id, answered from a Hugging Face cache on disk (offline), and the fp16
`variant`: the way the default model is read on a machine that downloaded it before.

The cache is written here by hand in the layout huggingface_hub reads (checked against the installed
2.x: `snapshot_download` offline resolves `refs/main` to a commit and returns `snapshots/<commit>/`):

    <HF_HUB_CACHE>/models--ORG--NAME/
        refs/main                        the commit hash, no newline
        blobs/<sha256>                   file contents
        snapshots/<commit>/unet/...      relative symlinks to ../../blobs/<sha256>

huggingface_hub 2.x also caches a tree listing (`trees/<commit>.json`) when it downloads; without
one it cannot tell an incomplete snapshot and returns the folder as it is, which is what a cache
written by an older version looks like. Nothing here reaches the network: HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures_sd import build_references, compare_with_references, isolate_hub_cache, write_diffusers_folder
from tokenflow import load_models
from tokenflow.models.loading import ModelNotAvailable

pytest.importorskip("diffusers")

REPO_ID = "tiny-org/tiny-sd21"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# The weight files of a diffusers SD folder, as the published repositories name their fp16 copies.
WEIGHTS = ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model")


def round_to_float16(refs):
    """The references with every weight rounded through float16, so that an fp16 file read back
    in float32 holds exactly their values and the parity bound stays the float32 one."""
    with torch.no_grad():
        for model in (refs.unet, refs.vae, refs.text):
            for p in model.parameters():
                p.copy_(p.half().float())
    return refs


def write_fp16_variant_folder(root: Path, refs) -> Path:
    """A diffusers folder whose weights exist ONLY as `<stem>.fp16.safetensors`, in float16."""
    write_diffusers_folder(root, refs)
    for stem in WEIGHTS:
        full = root / f"{stem}.safetensors"
        state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(full).items()}
        save_file(state, root / f"{stem}.fp16.safetensors")
        full.unlink()
    return root


def write_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """`folder`'s files as the cached snapshot `commit` of model repo `repo_id` (branch main)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)  # read verbatim: a newline would be part of the hash
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    return isolate_hub_cache(monkeypatch, tmp_path / "hf")


@pytest.fixture(scope="module")
def fp16_refs_and_folder(tmp_path_factory):
    refs = round_to_float16(build_references())
    return refs, write_fp16_variant_folder(tmp_path_factory.mktemp("staging") / "tiny-sd21", refs)


def test_hub_id_with_fp16_variant_loads_from_the_cache(hub_cache, fp16_refs_and_folder):
    refs, folder = fp16_refs_and_folder
    snapshot = write_hub_cache(hub_cache, REPO_ID, folder)
    assert (snapshot / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_symlink()

    models = load_models(REPO_ID, variant="fp16")
    assert models.config.source == REPO_ID and models.config.layout == "diffusers"
    assert next(models.unet.parameters()).dtype == torch.float32  # fp16 files, read in the dtype asked for
    diffs = compare_with_references(models, refs)
    print("parity (hub cache, fp16 variant):", diffs)
    assert max(diffs.values()) <= 1e-4, diffs

    half = load_models(REPO_ID, variant="fp16", dtype=torch.float16)
    assert {p.dtype for p in half.unet.parameters()} == {torch.float16}


def test_hub_id_without_the_variant_says_which_variant_is_there(hub_cache, fp16_refs_and_folder):
    write_hub_cache(hub_cache, REPO_ID, fp16_refs_and_folder[1])
    with pytest.raises(FileNotFoundError) as err:
        load_models(REPO_ID)
    text = str(err.value)
    assert re.search(r"snapshots/[0-9a-f]{40}/unet/diffusion_pytorch_model\.safetensors: missing", text), text
    assert "diffusion_pytorch_model.fp16.safetensors" in text and "variant='fp16'" in text


def test_hub_id_not_in_the_cache_names_id_cache_and_local_paths(hub_cache, fp16_refs_and_folder):
    write_hub_cache(hub_cache, REPO_ID, fp16_refs_and_folder[1])  # another repository is cached: not this one
    with pytest.raises(ModelNotAvailable) as err:
        load_models("tiny-org/not-cached", variant="fp16")
    text = str(err.value)
    assert "'tiny-org/not-cached'" in text and f"cache {hub_cache}" in text
    assert "give a local copy as model.source=PATH (--model PATH in the tools): a diffusers folder or an ldm file" in text
    assert "hf download tiny-org/not-cached --include model_index.json" in text
