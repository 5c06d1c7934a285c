"""What an experiment trains: :class:`ExperimentSpec` and its ablation rows (:func:`parse_ablation`)."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .._validate import check_temperature, check_weight
from ..train import TrainConfig
from ..train.embed_transfer import check_embed_init

__all__ = ["ExperimentSpec", "Ablation", "parse_ablation", "ABLATIONS", "SPEC_KEYS", "CONFIG_KEYS"]

# named ablations (one row; a plain + student pair for "merge"; teachers and students for "segments")
ABLATIONS = ("single", "hint", "cotrain", "kd-stop", "kd-stop-merge", "merge", "partition", "segments")
# settings an ablation item KEY=VALUE may change, on the spec or on its TrainConfig
SPEC_KEYS = ("mode", "gate", "gate_fit", "ensemble", "temperature", "hard_weight", "kd_weight", "teacher_folds",
             "augment", "augment_swap", "teacher_rows", "student_dropout", "student_head_init", "hint_weight",
             "student_embed_init")
CONFIG_KEYS = ("early_stop", "patience", "monitor_fraction", "monitor_window", "merge_validation", "lr", "batch_size",
               "max_epochs", "reduce_lr_on_plateau", "average_window", "grad_clip_norm")
# settings that change the plain DNN too: an ablation of them adds a plain-DNN row
PLAIN_KEYS = ("student_dropout", "student_head_init", "early_stop", "patience", "monitor_fraction", "monitor_window",
              "merge_validation", "lr", "batch_size", "max_epochs", "reduce_lr_on_plateau", "average_window",
              "grad_clip_norm")


@dataclass
class ExperimentSpec:
    """What to train. Model keyword arguments go to :func:`fastkd.models.build_model`.

    The distillation settings are those of :class:`~fastkd.Distiller`; ``segment_field`` names a
    field whose values split the test rows into segments for a per-segment AUC table.
    ``student_dropout`` (None: ``model_kwargs``' dropout) is the dropout of the student network,
    the distilled students and the plain DNN alike; teachers keep ``model_kwargs``'. Several values
    (a tuple, or text ``"0.1/0.3"``) are candidates: every student and the plain DNN is trained once
    per value and the one with the best stopping value on the monitor rows is kept (the same rule
    for every model; cost: one training per candidate). Default ``(0.1, 0.3)``: on six datasets'
    dev splits the chosen student gained more over the equally chosen plain DNN than at a fixed
    0.3 on every one (``docs/accuracy.md``, round 10). ``student_head_init`` (None: the models'
    default, "torch") is the student network's output-layer initialisation, students and plain
    DNN alike (:class:`~fastkd.models.CTRModel`'s ``head_init``). ``hint_weight`` and
    ``student_embed_init`` are :class:`~fastkd.Distiller`'s (distilled students only).
    """

    teachers: Sequence[str] = ("deepfm", "dcn", "xdeepfm")
    student: str = "dnn"
    mode: str = "pretrain"
    gate: str = "features"
    gate_fit: Optional[str] = None
    ensemble: str = "logit"
    temperature: float = 1.0
    hard_weight: float = 1.0
    kd_weight: float = 1.0
    teacher_folds: int = 1
    augment: float = 1.0
    augment_swap: float = 0.2
    teacher_rows: str = "train"
    student_dropout: Union[None, float, Tuple[float, ...]] = (0.1, 0.3)
    student_head_init: Optional[str] = None
    hint_weight: float = 0.0
    student_embed_init: Optional[str] = None
    seeds: Sequence[int] = (0,)
    ablations: Sequence[str] = ()
    model_kwargs: Dict[str, object] = field(default_factory=dict)
    config: TrainConfig = field(default_factory=TrainConfig)
    segment_field: Optional[str] = None

    def __post_init__(self) -> None:
        from ..train.distiller import GATE_FITS, GATES, TEACHER_ROWS

        if self.mode not in ("pretrain", "cotrain"):
            raise ValueError(f"mode must be 'pretrain' or 'cotrain', got {self.mode!r}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.gate_fit is not None and self.gate_fit not in GATE_FITS:
            raise ValueError(f"gate_fit must be one of {GATE_FITS}, got {self.gate_fit!r}")
        if isinstance(self.teacher_folds, bool) or not isinstance(self.teacher_folds, int) or self.teacher_folds < 1:
            raise ValueError(f"teacher_folds must be an int >= 1, got {self.teacher_folds!r}")
        check_temperature(self.temperature)  # the Distiller's checks, made when the spec is
        for name in ("augment", "augment_swap", "hard_weight", "kd_weight", "hint_weight"):
            check_weight(name, getattr(self, name))
        if self.ensemble not in ("logit", "prob"):
            raise ValueError(f"ensemble must be 'logit' or 'prob', got {self.ensemble!r}")
        _check_model_kwargs(self.model_kwargs)
        from ..models.base import HEAD_INITS

        if self.student_head_init is not None and self.student_head_init not in HEAD_INITS:
            raise ValueError(f"student_head_init must be None or one of {HEAD_INITS}, got {self.student_head_init!r}")
        check_embed_init(self.student_embed_init, self.mode)
        if self.teacher_rows not in TEACHER_ROWS:
            raise ValueError(f"teacher_rows must be one of {TEACHER_ROWS}, got {self.teacher_rows!r}")
        if self.teacher_rows == "merged" and not self.config.merge_validation:
            raise ValueError("teacher_rows='merged' needs merged validation (merge_validation=True)")
        self.student_dropout = _dropouts(self.student_dropout)
        if not 0 < self.augment_swap <= 1:
            raise ValueError(f"augment_swap must be in (0, 1], got {self.augment_swap}")

    @property
    def student_kwargs(self) -> Dict[str, object]:
        """The student network's model arguments: ``model_kwargs`` with ``student_dropout``
        (one value; with candidates, ask each of :meth:`student_candidates`)."""
        if isinstance(self.student_dropout, tuple):
            raise ValueError(f"student_dropout {self.student_dropout} names candidates, not one network: "
                             "build from each of student_candidates()")
        extra = {} if self.student_dropout is None else {"dropout": self.student_dropout}
        if self.student_head_init is not None:
            extra["head_init"] = self.student_head_init
        return {**self.model_kwargs, **extra}

    def student_candidates(self) -> List["ExperimentSpec"]:
        """One spec per student-dropout candidate (just this spec when there is one value)."""
        if not isinstance(self.student_dropout, tuple):
            return [self]
        return [dataclasses.replace(self, student_dropout=p) for p in self.student_dropout]

    def with_overrides(self, overrides: Dict[str, object]) -> "ExperimentSpec":
        """A copy with spec and config settings replaced (keys of :data:`SPEC_KEYS`/:data:`CONFIG_KEYS`)."""
        spec_kw = {k: v for k, v in overrides.items() if k in SPEC_KEYS}
        cfg_kw = {k: v for k, v in overrides.items() if k in CONFIG_KEYS}
        if "early_stop" in cfg_kw and "patience" not in cfg_kw:
            cfg_kw["patience"] = None  # the new rule's own default
        config = dataclasses.replace(self.config, **cfg_kw) if cfg_kw else self.config
        if self.teacher_rows == "merged" and "teacher_rows" not in spec_kw and not config.merge_validation:
            spec_kw["teacher_rows"] = "train"  # a row without merged rows: its teachers take the training split
        return dataclasses.replace(self, config=config, **spec_kw)  # checked again, settings and config together


@dataclass
class Ablation:
    """One ablation: a label, the settings it overrides, and whether the plain DNN runs under it too."""

    name: str
    label: str
    overrides: Dict[str, object]
    plain: bool = False


def _check_model_kwargs(kwargs: Dict[str, object]) -> None:
    """The model arguments every model shares, checked when the spec is made (not when the first
    model is built, after earlier rows have trained)."""
    from ..models.base import _check_dropout, _check_hidden_units

    if "dropout" in kwargs:
        d = kwargs["dropout"]
        if isinstance(d, bool) or not isinstance(d, (int, float)):
            raise ValueError(f"dropout must be a number in [0, 1), got {d!r}")
        _check_dropout(d)
    if "hidden_units" in kwargs:
        _check_hidden_units(kwargs["hidden_units"])
    if "embed_dim" in kwargs:
        e = kwargs["embed_dim"]
        if isinstance(e, bool) or not isinstance(e, int) or e < 1:
            raise ValueError(f"embed_dim must be an int >= 1, got {e!r}")


def _dropouts(value) -> Union[None, float, Tuple[float, ...]]:
    """``student_dropout`` checked: None, one number, or several distinct candidates (a sequence,
    or text with ``/`` or ``,`` between them) as a tuple."""
    if isinstance(value, str) and value.strip().lower() in ("none", "default"):
        value = None  # the teachers' dropout (model_kwargs)
    if isinstance(value, str):
        try:
            value = tuple(float(v) for v in re.split(r"[/,]", value))
        except ValueError:
            value = (value,)
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    many = isinstance(value, (list, tuple))
    for v in value if many else [value]:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1) \
                or v is None and many:
            raise ValueError("student_dropout must be None, a number in [0, 1) or several such numbers "
                             f"(e.g. '0.1/0.3'), got {value!r}")
    if many and len(set(value)) != len(value):
        raise ValueError(f"student_dropout candidates must differ, got {value!r}")
    return tuple(float(v) for v in value) if many else value


def _value(text: str):
    low = text.strip().lower()
    if low in ("true", "on", "yes"):
        return True
    if low in ("false", "off", "no"):
        return False
    if low in ("none", "default"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_ablation(item: str, spec: ExperimentSpec) -> Ablation:
    """A named ablation (:data:`ABLATIONS`) or ``KEY=VALUE[+KEY=VALUE...]`` overrides of the spec.

    Example:
        >>> parse_ablation("teacher_folds=1+augment=0", ExperimentSpec()).overrides
        {'teacher_folds': 1, 'augment': 0}
    """
    item = item.strip()
    if item in ABLATIONS:
        return _named(item, spec)
    overrides: Dict[str, object] = {}
    for part in item.split("+"):
        key, eq, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in SPEC_KEYS + CONFIG_KEYS:
            raise ValueError(f"unknown ablation {item!r}; give one of {', '.join(ABLATIONS)} or KEY=VALUE "
                             f"(joined by '+') with KEY in {', '.join(SPEC_KEYS + CONFIG_KEYS)}")
        if key in overrides:
            raise ValueError(f"ablation {item!r} sets {key} twice")
        overrides[key] = _value(value)
    spec.with_overrides(overrides)  # raises now for a bad value (TrainConfig checks its own)
    return Ablation(item, ", ".join(f"{k}={v}" for k, v in overrides.items()), overrides,
                    plain=any(k in PLAIN_KEYS for k in overrides))


def _named(name: str, spec: ExperimentSpec) -> Ablation:
    cfg = spec.config
    no_folds = {"teacher_folds": 1} if spec.teacher_folds > 1 else {}
    note = " (teachers not cross-fitted)" if no_folds else ""
    if name == "single":
        return Ablation(name, "", {})
    if name == "hint":
        gate = "mean" if spec.gate == "features" else spec.gate
        return Ablation(name, "hint instead of soft label" + note,
                        {"kd_weight": 0.0, "hint_weight": 1.0, "gate": gate, **no_folds})
    if name == "cotrain":
        gate = spec.gate if spec.gate in ("logit", "hidden", "mean") else "logit"
        return Ablation(name, "co-train", {"mode": "cotrain", "gate": gate, "gate_fit": "joint", "augment": 0.0,
                                           "student_embed_init": None, **no_folds})
    if name == "kd-stop":
        return Ablation(name, "stop on kd loss", {"early_stop": "kd", "merge_validation": False})
    if name == "kd-stop-merge":
        return Ablation(name, "stop on kd loss, merged valid", {"early_stop": "kd", "merge_validation": True})
    if name == "merge":
        # the plain DNN and the gated student under the other merge_validation setting:
        # separates what the extra validation rows give from what distillation gives
        merged = not cfg.merge_validation
        label = (f"merged valid, {cfg.early_stop} on held-out slice" if merged
                 else f"not merged, {cfg.early_stop} on whole valid split")
        return Ablation(name, label, {"merge_validation": merged}, plain=True)
    if name == "partition":
        return Ablation(name, "D", {**no_folds})
    if name == "segments":
        if spec.segment_field is None:
            raise ValueError("the 'segments' ablation needs a segment field (--segment-field)")
        return Ablation(name, "segment experts", {**no_folds})
    raise ValueError(f"unknown ablation {name!r}")


def expand_ablations(items: Sequence[str], spec: ExperimentSpec) -> List[Ablation]:
    """Parse every item ('all' expands to the named ablations)."""
    out: List[Ablation] = []
    for item in items:
        if item == "all":
            out += [_named(n, spec) for n in ABLATIONS if n != "segments" or spec.segment_field is not None]
        else:
            out.append(parse_ablation(item, spec))
    return out


def split_overrides(overrides: Dict[str, object]) -> Tuple[Dict[str, object], Dict[str, object]]:
    """``(spec/config overrides, Distiller-only keyword arguments)``."""
    known = {k: v for k, v in overrides.items() if k in SPEC_KEYS + CONFIG_KEYS}
    extra = {k: v for k, v in overrides.items() if k not in SPEC_KEYS + CONFIG_KEYS}
    return known, extra
