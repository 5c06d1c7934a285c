"""Fused multi-field embedding for CTR models.

CTR inputs are ``F`` categorical fields per sample, each with its own vocabulary. The obvious
implementation (one ``nn.Embedding`` per field, looped in Python) launches ``F`` lookups and ``F``
backward scatters per step, which dominates the step time of a small student network on CPU.
:class:`MultiFieldEmbedding` stores every field's rows in *one* table and shifts each field's ids
by a per-field offset, so a whole ``[B, F]`` batch is a single lookup.

Backward gives a dense gradient (the default), a sparse one with duplicate rows merged
(``sparse=True``), or no gradient at all: with ``fused_optimizer="sgd"|"adagrad"`` the touched
rows are updated inside backward, as ``torch.optim.SGD`` / ``Adagrad`` would on a sparse gradient,
and no table-sized gradient ever exists. On CUDA the work runs in the Triton kernels of
:mod:`fastkd.kernels.embedding`; on CPU in their plain-PyTorch twins
(:mod:`fastkd.reference.embedding`, also the test oracle), except the sparse and fused backward,
which the native extension ``fastkd._embedding`` does in one pass when it is built
(:mod:`fastkd.embedding._native`; :data:`NATIVE_CPU`). The choice is made in one place,
:func:`~fastkd.embedding.ops._impl`. Every launcher is also a ``torch.library`` op
(``fastkd::<launcher>``) with a fake kernel, so ``torch.compile(fullgraph=True)`` traces a model
through the lookup and its backward, fused update included. Two things stay eager-only: sparse
gradients (dynamo does not trace ``sparse_coo_tensor``: a graph break) and the error on a second
backward through one fused forward (a compiled backward applies the update again).

One job per file:

* :mod:`~fastkd.embedding.modules`: the ``nn.Module`` forms, :class:`MultiFieldEmbedding` and
  :class:`MultiFieldEmbeddingRef`, the plain per-field version (one ``nn.Embedding`` or
  ``nn.EmbeddingBag`` per field), kept as a test oracle and for readability;
* :mod:`~fastkd.embedding.ops`: the op, i.e. the dispatch seam, the ``torch.library`` ops,
  :class:`MultiFieldEmbeddingFunction` and :func:`multi_field_embedding`;
* :mod:`~fastkd.embedding._checks`: argument checks shared by both;
* :mod:`~fastkd.embedding._native`: the wrapper of the native CPU backward.
"""
from .modules import DEFAULT_INIT_STD, MultiFieldEmbedding, MultiFieldEmbeddingRef
from .ops import NATIVE_CPU, MultiFieldEmbeddingFunction, _impl, multi_field_embedding  # noqa: F401 (_impl: the seam)

__all__ = [
    "MultiFieldEmbedding",
    "MultiFieldEmbeddingFunction",
    "MultiFieldEmbeddingRef",
    "multi_field_embedding",
    "NATIVE_CPU",
    "DEFAULT_INIT_STD",
]
