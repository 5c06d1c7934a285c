"""Start the student's embedding tables from a trained teacher's (``Distiller(student_embed_init="teacher")``).

The teachers of a pre-train run have learned an embedding per feature value on the same rows and
encoder the student uses; a student of the same field sizes and embedding width can start from
those tables instead of random ones and fine-tune them (serving cost unchanged). Which teacher:
the one with the best AUC on the monitor rows among those whose tables fit the student's. Only
the embedding is copied; the student's network keeps its own initialisation.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..metrics import roc_auc

__all__ = ["EMBED_INITS", "check_embed_init", "embedding_source", "copy_embedding"]

# None: the student's own initialisation; "teacher": the best fitting teacher's tables
EMBED_INITS = ("teacher",)


def check_embed_init(value: Optional[str], mode: str) -> None:
    """``student_embed_init`` checked (the Distiller's and the experiment spec's one check)."""
    if value is not None and value not in EMBED_INITS:
        raise ValueError(f"student_embed_init must be None or one of {EMBED_INITS}, got {value!r}")
    if value is not None and mode != "pretrain":
        raise ValueError("student_embed_init copies a trained teacher's embedding: it needs mode='pretrain'")


def _state(model: nn.Module) -> Optional[dict]:
    emb = getattr(model, "embedding", None)
    return emb.state_dict() if isinstance(emb, nn.Module) else None


def _fits(student_state: dict, teacher_state: Optional[dict]) -> bool:
    return (teacher_state is not None and teacher_state.keys() == student_state.keys()
            and all(teacher_state[k].shape == v.shape for k, v in student_state.items()))


def embedding_source(student: nn.Module, teachers: Sequence[nn.Module], teacher_logits: torch.Tensor,
                     labels) -> int:
    """Index of the teacher whose embedding the student starts from: the best monitor AUC among
    the teachers whose ``embedding`` has the student's parameter names and shapes.

    Args:
        student: a model with an ``embedding`` module (every :mod:`fastkd.models` model has one).
        teachers: the M trained teachers.
        teacher_logits: the teachers' logits on the monitor rows.
        labels: the monitor rows' labels.

    Shape:
        teacher_logits ``[N, M]``, labels ``[N]``.

    Raises:
        ValueError: no teacher's embedding fits the student's (other field sizes or width).

    Example:
        >>> from fastkd.models import build_model
        >>> s = build_model("dnn", [5, 7], embed_dim=4, hidden_units=(8,))
        >>> ts = [build_model("dcn", [5, 7], embed_dim=8, hidden_units=(8,)),
        ...       build_model("deepfm", [5, 7], embed_dim=4, hidden_units=(8,))]
        >>> embedding_source(s, ts, torch.randn(6, 2), [0, 1, 0, 1, 0, 1])  # the DCN's width differs
        1
    """
    st = _state(student)
    if st is None:
        raise ValueError("student_embed_init='teacher' needs a student with an `embedding` module "
                         f"(a fastkd model), got {type(student).__name__}")
    fitting = [i for i, t in enumerate(teachers) if _fits(st, _state(t))]
    if not fitting:
        raise ValueError("student_embed_init='teacher': no teacher's embedding has the student's field sizes and "
                         "embedding width (give the student the teachers' embed_dim)")
    y = np.asarray(labels, dtype=np.float64)
    z = torch.as_tensor(teacher_logits).double().numpy()
    aucs = [roc_auc(y, z[:, i]) for i in fitting]
    return fitting[int(np.argmax(aucs))]  # ties: the first listed


@torch.no_grad()
def copy_embedding(student: nn.Module, teacher: nn.Module) -> None:
    """Copy ``teacher.embedding``'s parameters and buffers into ``student.embedding`` in place
    (the optimiser's parameter objects stay the same)."""
    st, tt = _state(student), _state(teacher)
    if st is None or not _fits(st, tt):
        raise ValueError("the teacher's embedding does not fit the student's (field sizes, width or layout)")
    for key, value in st.items():
        value.copy_(tt[key])
