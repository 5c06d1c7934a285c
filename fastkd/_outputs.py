"""Model outputs given as probabilities (``student_outputs``/``teacher_outputs="prob"``): the
checks, the exact conversion to logits, and the warning when probabilities look passed as logits
(the likeliest silent mistake with trainers whose models end in a sigmoid)."""
from __future__ import annotations

import warnings

import torch

from . import _validate as V

OUTPUTS = ("logit", "prob")
# ``*_outputs="prob"``: probabilities are clamped to [PROB_EPS, 1 - PROB_EPS] (in float32 at least)
# and then converted exactly, ``torch.logit``; the clamp bounds the logits to about ±16.
PROB_EPS = 1e-7
# ``*_outputs="logit"`` and every value of a batch of at least PROB_CHECK_MIN_BATCH rows in [0, 1],
# spread over at least PROB_CHECK_MIN_SPAN: a warning. Near-constant batches are left alone: an
# untrained or tiny model's logits often all sit in [0, 1] (fastkd's own test runs: spans < 0.08).
PROB_CHECK_MIN_BATCH = 64
PROB_CHECK_MIN_SPAN = 0.2


def _check_outputs(arg: str, outputs: str) -> None:
    if outputs not in OUTPUTS:
        raise ValueError(f"{arg} must be one of {OUTPUTS}, got {outputs!r}")


def _to_logits(name: str, arg: str, t: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``t`` as logits: itself for ``"logit"`` outputs; for ``"prob"``, the exact logit of the
    probabilities clamped to [PROB_EPS, 1 - PROB_EPS] (float16/bfloat16 in float32, where the
    clamp is representable). Differentiable: a student's gradient flows back to its sigmoid."""
    if num_classes != 1:
        raise ValueError(
            f"{arg}='prob' is for binary outputs (sigmoid probabilities); {name} {list(t.shape)} has "
            f"{num_classes} classes: pass logits (log-probabilities are valid softmax logits)"
        )
    if V.values_checkable(t):
        bad = (t < 0) | (t > 1)  # NaN passes and gives a NaN loss, as a NaN logit does
        if bool(bad.any()):
            i = tuple(int(k) for k in bad.nonzero()[0])
            raise ValueError(
                f"{name} must be probabilities in [0, 1] with {arg}='prob'; "
                f"{name}[{', '.join(map(str, i))}] = {t[i].item()}"
            )
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return torch.logit(t, eps=PROB_EPS)


def _looks_like_probabilities(t: torch.Tensor) -> bool:
    """Whether every value of a batch of at least PROB_CHECK_MIN_BATCH rows lies in [0, 1], spread
    over at least PROB_CHECK_MIN_SPAN (a near-constant batch, e.g. an untrained model's, says
    nothing: its logits may well all lie in [0, 1]).

    Reads the values: one host sync on an accelerator, so the losses call it on CPU tensors
    only, and the modules on a few of their calls elsewhere."""
    if t.dim() == 0 or t.shape[0] < PROB_CHECK_MIN_BATCH or t.numel() == 0:
        return False
    lo, hi = torch.aminmax(t.detach())
    lo, hi = float(lo), float(hi)
    return 0.0 <= lo and hi <= 1.0 and hi - lo >= PROB_CHECK_MIN_SPAN


def _warn_if_probabilities(name: str, arg: str, t: torch.Tensor, outputs: str) -> None:
    if outputs == "logit" and _looks_like_probabilities(t):
        # a constant message: Python's default warning filter then shows it once per process
        warnings.warn(
            f"every value of {name} lies in [0, 1] in a batch of >= {PROB_CHECK_MIN_BATCH} rows: "
            f"if they are probabilities (a sigmoid output), pass {arg}='prob' (or drop the sigmoid); "
            f"they are read as logits",
            UserWarning,
            stacklevel=4,  # the caller of distill_loss / gated_distill_loss
        )


def _check_output_kinds(student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_outputs: str,
                       teacher_outputs: str, force: bool = False) -> None:
    """Warn when ``*_outputs="logit"`` inputs look like probabilities; CPU tensors only, unless
    ``force`` (a module's spot checks, one host sync each)."""
    if force or V.values_checkable(student_logits):
        if torch.compiler.is_compiling():
            return
        _warn_if_probabilities("student_logits", "student_outputs", student_logits, student_outputs)
        _warn_if_probabilities("teacher_logits", "teacher_outputs", teacher_logits, teacher_outputs)
