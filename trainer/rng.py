"""The process's RNG streams (python, numpy, torch CPU, CUDA): capture, restore, and one guard.

Three things need them: a checkpoint (each process saves its own streams, so a resumed run draws
what the uninterrupted one would have), the data pipeline (each training sample seeds the streams
for its augmentation and gives the caller's streams back), and the training-time diagnostics
(which must not change what training draws next). All three use the functions below.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def capture_rng_state(cuda: bool = True) -> dict:
    """Every RNG stream of this process, as tensors and plain values (loads with weights_only=True)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss),
        "torch": torch.get_rng_state(),
    }
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's own device only: a resume may see other devices, or map ranks to them differently
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        saved, device = state["cuda"], torch.cuda.current_device()
        if isinstance(saved, list | tuple):  # checkpoints before 2026-12 saved every visible device's stream
            if device >= len(saved):
                warnings.warn(f"the checkpoint holds CUDA RNG streams of {len(saved)} devices and this process "
                              f"uses device {device}: its CUDA stream starts afresh (GPU dropout draws differ)",
                              stacklevel=2)
                return
            saved = saved[device]
        torch.cuda.set_rng_state(saved, device)


def _as_tuple(value: Any) -> Any:
    """JSON-like lists back to the nested tuples `random.setstate` wants."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


@contextmanager
def preserved_rng_state(cuda: bool = True) -> Iterator[None]:
    """Every RNG stream of this process (CUDA too unless `cuda=False`) as it was on entry, on exit."""
    state = capture_rng_state(cuda)
    try:
        yield
    finally:
        restore_rng_state(state)
