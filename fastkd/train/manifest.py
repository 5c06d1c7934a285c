"""Manifests of training artifacts: what a checkpoint or a teacher cache was made from.

Every artifact fastkd writes to disk carries one (a checkpoint inside its file, a teacher cache
in its ``cache.json``):

| field | what it holds |
|---|---|
| ``format``, ``format_version`` | which artifact, and the layout version (:data:`FORMAT_VERSION`) |
| ``data`` | :func:`data_fingerprint` of the rows it was made from: rows, fields, xxh3-128 of ids (and labels) |
| ``config`` | the :class:`~fastkd.train.TrainConfig` fields that change a run's numbers (:func:`resume_config`) |
| ``shapes`` | parameter and buffer names with their shapes, per module (:func:`module_shapes`) |
| ``checksum`` | xxh3-128 of the payload: a checkpoint's state (:func:`state_digest`), a cache's files |

Before an artifact is used its manifest is compared with what the caller expects
(:func:`check_fields`): the first field that differs raises :class:`ArtifactMismatchError`, a file
that cannot be read whole raises :class:`CorruptArtifactError`; both name the file.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import numpy as np
import torch
import xxhash
from torch import nn

__all__ = [
    "FORMAT_VERSION", "ArtifactError", "ArtifactMismatchError", "CorruptArtifactError",
    "data_fingerprint", "module_shapes", "models_manifest", "state_digest", "file_checksum", "resume_config",
    "check_fields",
]

FORMAT_VERSION = 1

# TrainConfig fields that never change a run's numbers: a resume may change them.
# (max_epochs only bounds the loop: resuming with more epochs continues the same run.)
_FREE_CONFIG_FIELDS = frozenset({"max_epochs", "progress", "eval_batch_size"})


class ArtifactError(ValueError):
    """A checkpoint or teacher cache that cannot be used; ``path`` is the file at fault."""

    def __init__(self, path: Union[str, Path], message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{path}: {message}")


class ArtifactMismatchError(ArtifactError):
    """The artifact was made by another run: its manifest's ``field`` holds ``found`` where this
    run has ``expected``."""

    def __init__(self, path: Union[str, Path], field: str, expected: Any, found: Any, hint: str = "") -> None:
        self.field, self.expected, self.found = field, expected, found
        msg = f"{field} differs: expected {_short(expected)} (this run), found {_short(found)} (the file)"
        super().__init__(path, msg + (f" ({hint})" if hint else ""))


class CorruptArtifactError(ArtifactError):
    """The file cannot be read whole: ``problem`` is "truncated" (it ends early) or "corrupt"."""

    def __init__(self, path: Union[str, Path], problem: str, detail: str) -> None:
        if problem not in ("truncated", "corrupt"):
            raise ValueError(f"problem must be 'truncated' or 'corrupt', got {problem!r}")
        self.problem = problem
        super().__init__(path, f"{problem}: {detail}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------------------------
# digests
# --------------------------------------------------------------------------------------------
def _update_array(h, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.reshape(-1).view(np.uint8))


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _blocks(x) -> list:
    """The row blocks of an array, a tensor, a list of them, or (Tensor)Rows (their parts)."""
    from ..data.rows import Rows, TensorRows

    if isinstance(x, TensorRows):
        x = x.rows
    if isinstance(x, Rows):
        return list(x.parts)
    return list(x) if isinstance(x, (list, tuple)) else [x]


def data_fingerprint(ids, labels=None) -> Dict[str, Any]:
    """``{"rows", "fields", "ids", "labels"}`` of ids ``[N, F]`` (and labels ``[N]``; None when not
    given): xxh3-128 digests of the arrays' dtypes, shapes and bytes (about 10 GB/s; numpy arrays
    or CPU tensors).

    ``ids`` may be a list of row blocks with the same fields; the digest is that of their
    concatenation, without building it.
    """
    blocks = [_as_numpy(b) for b in _blocks(ids)]
    if any(b.ndim != 2 for b in blocks) or len({b.shape[1] for b in blocks}) != 1:
        raise ValueError(f"ids must be [N, F] blocks with one F, got shapes {[b.shape for b in blocks]}")
    label_hash = None if labels is None else _blocks_digest([_as_numpy(b) for b in _blocks(labels)])
    return {"rows": sum(int(b.shape[0]) for b in blocks), "fields": int(blocks[0].shape[1]),
            "ids": _blocks_digest(blocks), "labels": label_hash}


def _blocks_digest(blocks: list) -> str:
    """xxh3-128 of the blocks' concatenation as :func:`_update_array` digests one array (dtype,
    shape, bytes), without building it; blocks are cast to the first one's dtype."""
    h = xxhash.xxh3_128()
    shape = (sum(int(b.shape[0]) for b in blocks),) + tuple(int(d) for d in blocks[0].shape[1:])
    h.update(f"{blocks[0].dtype.str}{shape}".encode())
    for b in blocks:
        h.update(np.ascontiguousarray(b, dtype=blocks[0].dtype).reshape(-1).view(np.uint8))
    return h.hexdigest()


def module_shapes(modules: Mapping[str, nn.Module]) -> Dict[str, Dict[str, list]]:
    """``{module name: {state_dict key: shape}}``: parameters and buffers."""
    return {name: {k: list(v.shape) for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
            for name, m in modules.items()}


def models_manifest(models) -> Dict[str, Any]:
    """``{"shapes", "weights"}`` of a sequence of models (teachers): :func:`module_shapes` keyed by
    position, and a :func:`state_digest` of their state dicts (ties targets to the exact weights)."""
    models = list(models)
    return {"shapes": module_shapes({str(i): m for i, m in enumerate(models)}),
            "weights": state_digest([m.state_dict() for m in models])}


def _update_tensor(h, t: torch.Tensor) -> None:
    t = t.detach()
    if t.is_sparse:
        t = t.coalesce()
        h.update(b"sparse")
        _update_tensor(h, t.indices())
        _update_tensor(h, t.values())
        return
    t = t.cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())


def _update_obj(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        h.update(b"T")
        _update_tensor(h, obj)
    elif isinstance(obj, np.ndarray):
        h.update(b"A")
        _update_array(h, obj)
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _update_obj(h, k)
            _update_obj(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for v in obj:
            _update_obj(h, v)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes, np.generic, torch.dtype, torch.Size)):
        h.update(f"S{type(obj).__name__}:{obj!r};".encode())
    else:  # anything else a state may hold: its pickle
        h.update(f"P{type(obj).__qualname__}:".encode())
        h.update(pickle.dumps(obj, protocol=4))


def state_digest(obj: Any) -> str:
    """xxh3-128 of a nested state (dicts, lists, tuples, tensors, arrays, plain values) in order:
    a checkpoint's payload checksum, computed from the objects rather than the file's bytes."""
    h = xxhash.xxh3_128()
    _update_obj(h, obj)
    return h.hexdigest()


def file_checksum(path: Union[str, Path], chunk: int = 1 << 24) -> str:
    """xxh3-128 of a file's bytes, read in 16 MiB chunks."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def read_json_object(path: Union[str, Path]) -> Dict[str, Any]:
    """A JSON object from ``path``, or :class:`CorruptArtifactError` naming it: "truncated" when
    the document ends early (it stops mid-value, or opens an object it never closes), "corrupt"
    otherwise (not text, not JSON, not an object)."""
    path = Path(path)
    text = path.read_bytes()
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        doc = exc.doc.strip() if isinstance(exc, json.JSONDecodeError) else ""
        ended = isinstance(exc, json.JSONDecodeError) and (exc.pos >= len(doc) or (
            doc.startswith("{") and not doc.endswith("}")))
        raise CorruptArtifactError(path, "truncated" if ended else "corrupt",
                                   f"not valid JSON ({len(text)} bytes: {exc})") from None
    if not isinstance(obj, dict):
        raise CorruptArtifactError(path, "corrupt", f"not a JSON object but a {type(obj).__name__}")
    return obj


# TrainConfig fields added after checkpoints were first written, with their defaults: left out of a
# manifest at the default, so older checkpoints and run folders still resume
_NEWER_FIELDS = {"steps_per_epoch": None, "row_blocks": None, "average_window": False, "grad_clip_norm": None}


def resume_config(cfg, free=_FREE_CONFIG_FIELDS) -> Dict[str, Any]:
    """The :class:`~fastkd.train.TrainConfig` fields a resumed run must share with the run that
    wrote the checkpoint: every field except ``free`` (default ``max_epochs``, ``progress`` and
    ``eval_batch_size``; a run folder's manifest keeps ``max_epochs``)."""
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in free}
    for name, default in _NEWER_FIELDS.items():  # at its default: as checkpoints written before the field existed
        if name in out and out[name] is default:
            out.pop(name)
    return out


# --------------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------------
_ABSENT = object()


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def check_fields(path: Union[str, Path], expected: Mapping[str, Any], found: Mapping[str, Any], *,
                 keys: Optional[Iterable[str]] = None, hint: str = "", _prefix: str = "") -> None:
    """Raise :class:`ArtifactMismatchError` at the first field (dotted, in ``expected``'s order) whose
    value in ``found`` differs; nested dicts are compared key by key, in both directions.

    ``keys``: compare only these top-level fields."""
    names = list(keys) if keys is not None else list(expected)
    if keys is None:
        names += [k for k in found if k not in expected]
    for k in names:
        e, f = expected.get(k, _ABSENT), found.get(k, _ABSENT)
        field = f"{_prefix}{k}"
        if isinstance(e, Mapping) and isinstance(f, Mapping):
            check_fields(path, e, f, hint=hint, _prefix=field + ".")
        elif e is _ABSENT or f is _ABSENT or _norm(e) != _norm(f):
            raise ArtifactMismatchError(path, field, None if e is _ABSENT else e, None if f is _ABSENT else f, hint)
