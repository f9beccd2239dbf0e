"""Reading safetensors files and filling a model from them, strictly.

Models are built on the `meta` device (no memory, no random init) and then every parameter is
*assigned* the tensor read from the file, already in the target dtype and device. Peak memory while
loading is therefore about one copy of the weights, never "random init + a copy".

Strict means: every parameter of the model is filled, every tensor of the file is used or on a short
named ignore list, and shapes are equal. Any violation is one error naming the key(s) and shapes.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the key(s)."""


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickle checkpoints ({', '.join(PICKLE_SUFFIXES)}) are refused. Unpickling runs "
            "arbitrary code from the file and cannot be read lazily. Convert it once to safetensors, "
            "e.g. python -c \"import torch, safetensors.torch as s; "
            f"sd = torch.load('{path.name}', map_location='cpu', weights_only=True); "
            "sd = sd.get('state_dict', sd); "
            f"s.save_file({{k: v.contiguous() for k, v in sd.items()}}, '{path.stem}.safetensors')\""
        )


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file size.

    Read by hand (8-byte little-endian length, then JSON) so a truncated or foreign file gets a
    clear message instead of a Rust panic from deep inside the safetensors library.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    refuse_pickle(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: not a safetensors file or truncated (header says {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + data_end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: tensors need {8 + n + data_end} bytes, file has {size}"
        )
    return header


def read_safetensors(
    path: Path | str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
    keys: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors of one safetensors file (all, or only `keys`), each cast to `dtype` as it is read."""
    from safetensors import safe_open

    path = Path(path)
    header = safetensors_header(path)
    wanted = list(header) if keys is None else [k for k in keys if k in header]
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for k in wanted:
            t = f.get_tensor(k)
            if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)  # one tensor at a time: the peak stays ~one copy of the weights
            out[k] = t
    return out


def assign_strict(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str,
    ignore: Iterable[str] = (),
) -> nn.Module:
    """Fill every parameter of `model` (built on meta) from `state`, by name, or raise.

    `ignore` lists checkpoint keys that are known and deliberately unused (e.g. position_ids).
    """
    ignore = set(ignore)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    expected = {**params, **buffers}
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected and k not in ignore)
    bad_shape = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
    if bad_shape:
        problems.append(f"{len(bad_shape)} shape mismatch(es): {_few(bad_shape)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    for name in expected:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        tensor = state[name]
        if name in params:
            setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
        else:
            setattr(module, attr, tensor)
    return model


def _few(items: list[str], n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (expected a JSON config here)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
