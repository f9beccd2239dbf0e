"""Where a run computes and in which precision: `device=` and `dtype=` made into torch's, and the
one-line message for an error that comes from the device rather than from the code."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch


@contextmanager
def cpu_threads(threads: int | None):
    """torch's intra-op CPU threads set to `threads` for the block (None: left as torch has them),
    and put back afterwards, so a run inside a longer process does not change the process."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(before)


def pick_device(name: str) -> str:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return f"cuda:{os.environ['LOCAL_RANK']}"  # torchrun: one GPU per rank of this machine
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device={name}: CUDA is not available on this machine; use device=cpu")
    return name


class DeviceError(RuntimeError):
    """The device `device=` names cannot be used: no CUDA, no such index, CUDA failed to start."""


def init_device(device: str) -> None:
    """Initialise CUDA for `device` before anything asks it for memory statistics: plain "cuda"
    initialises CUDA on first use, but with an index ("cuda:0", a torchrun rank's device) the
    allocator's statistics raise "Invalid device argument: did you call init?" until something has."""
    if not device.startswith("cuda"):
        return
    try:
        torch.cuda.init()
        index, count = torch.device(device).index, torch.cuda.device_count()
    except RuntimeError as e:
        raise DeviceError(f"device={device}: CUDA could not be started ({str(e).strip().splitlines()[0]})") from e
    if index is not None and not 0 <= index < count:
        raise DeviceError(f"device={device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def device_error_line(error: BaseException) -> str | None:
    """One line for an error that comes from the device (CUDA), None for any other: a DeviceError,
    CUDA running out of memory, a RuntimeError that names CUDA. Bugs keep their traceback."""
    if isinstance(error, DeviceError):
        return str(error)
    if isinstance(error, torch.cuda.OutOfMemoryError):
        first = str(error).strip().splitlines()[0] if str(error).strip() else "CUDA out of memory"
        return (f"{first} (fewer frames per forward: tokenflow.batch_size, inversion.batch_size; "
                "tokenflow.ff_chunk, tokenflow.query_chunk; see python -m tools.memory_estimate)")
    text = str(error).strip()
    if isinstance(error, RuntimeError) and ("CUDA" in text or "did you call init" in text):
        return f"device error: {text.splitlines()[0]}"
    return None


def pick_dtype(name: str, device: str) -> torch.dtype:
    """auto: float16 on a GPU; float32 on a CPU, also one with native bfloat16 (AVX512-BF16/AMX):
    bfloat16 there is faster but changes the edit, not just its last bits (the NN field's matches
    move), so the CPU's default stays the reference result and the speed is one override away,
    dtype=bfloat16 (docs/cpu-dtype.md has the measurements)."""
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"dtype must be auto or one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


