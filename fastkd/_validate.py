"""Input checks shared by the functional API and the modules.

Shape, dtype and argument checks are free (they read metadata only) and always run. Checks on
*values* (labels in range) need the data, which on an accelerator means a host sync; they run
for CPU tensors only, and are skipped while ``torch.compile`` traces, so that a compiled or
CUDA-graph-captured training step never blocks on the host.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_temperature(temperature) -> float:
    if isinstance(temperature, torch.Tensor):
        raise TypeError("temperature must be a Python number, not a tensor")
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    t = float(temperature)
    if not math.isfinite(t) or t <= 0.0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return t


def check_weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 0.0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return v


def check_logits(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (logits), got dtype {t.dtype}")


def values_checkable(t: torch.Tensor) -> bool:
    """Whether checking ``t``'s values costs no host sync and breaks no compiled graph."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    devices = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all inputs must be on one device, got {desc}")


def check_nonempty(name: str, batch: int) -> None:
    if batch == 0:
        raise ValueError(f"{name} is an empty batch (B = 0); a mean over no samples is undefined")


def prepare_labels(labels: torch.Tensor, batch: int, num_classes: int) -> torch.Tensor:
    """Validate labels and return them as float32 [B] (binary) or int64 [B] (C classes)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if num_classes == 1:
        if labels.dim() == 2 and labels.shape[1] == 1:
            labels = labels.reshape(-1)
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape [B] = [{batch}] for binary logits, got {list(labels.shape)}")
        if labels.is_complex():
            raise TypeError(f"labels must be real, got dtype {labels.dtype}")
        labels = labels.to(torch.float32)
        if values_checkable(labels):
            bad = ~((labels >= 0) & (labels <= 1))  # also catches NaN
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"labels must lie in [0, 1] for binary logits; labels[{i}] = {labels[i].item()}"
                )
        return labels
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape [B] = [{batch}] (class indices), got {list(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices for {num_classes}-class logits, got dtype {labels.dtype}")
    labels = labels.to(torch.int64)
    if values_checkable(labels):
        bad = (labels < 0) | (labels >= num_classes)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"labels must be class indices in [0, {num_classes}); labels[{i}] = {int(labels[i])}"
            )
    return labels
