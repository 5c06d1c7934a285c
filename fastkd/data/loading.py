"""One-call loading: spec -> encoded :class:`CTRData` (:func:`load`)."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple, Union

from .encoder import FeatureEncoder
from .readers import iter_table
from .synthetic import make_synthetic
from .table import CTRData

__all__ = ["load"]


def load(spec: str, *, encoder: Optional[FeatureEncoder] = None, kind: str = "vocab", min_count: int = 1,
         num_buckets=None, seed: int = 0, strict: bool = False, label: Optional[str] = None,
         numeric: Iterable[str] = (), columns: Optional[Sequence[str]] = None, chunk_rows: int = 200_000,
         return_encoder: bool = False) -> Union[CTRData, Tuple[CTRData, Optional[FeatureEncoder]]]:
    """Read and encode a data source in two streaming passes (fit, then transform).

    Only encoded ids of the whole source are held in memory, never all raw strings at once.
    ``spec`` may also be ``"synthetic"`` or ``"synthetic:N"``: :func:`make_synthetic` with
    ``n_samples=N`` (default 200,000) and ``seed`` (no encoder involved; it returns ``None`` for it).

    Args:
        spec: ``KIND:PATH[,PATH2,...]`` (see :func:`~fastkd.data.iter_table`) or ``synthetic[:N]``.
        encoder: an already fitted encoder to reuse (e.g. the training set's for a test set); if
            None a new ``FeatureEncoder(kind, min_count, num_buckets, seed)`` is fitted on this source.
        kind, min_count, num_buckets, seed: settings of the new encoder.
        strict, label, numeric, columns, chunk_rows: passed to :func:`~fastkd.data.iter_table`.
        return_encoder: also return the encoder.

    Returns:
        :class:`CTRData`, or ``(CTRData, encoder)`` with ``return_encoder=True``.

    Example:
        >>> train, enc = load("criteo:criteo_train.txt.gz", min_count=2, return_encoder=True)  # doctest: +SKIP
        >>> test = load("criteo:criteo_test.txt.gz", encoder=enc)                              # doctest: +SKIP
    """
    if isinstance(spec, str) and spec.strip().lower().split(":", 1)[0] == "synthetic":
        _, _, n = spec.partition(":")
        try:
            n_samples = int(n) if n.strip() else 200_000
        except ValueError:
            raise ValueError(f"spec {spec!r}: expected 'synthetic' or 'synthetic:N' with an integer N") from None
        data = make_synthetic(n_samples=n_samples, seed=seed)
        return (data, None) if return_encoder else data

    def chunks():
        return iter_table(spec, chunk_rows=chunk_rows, strict=strict, label=label, numeric=numeric,
                          columns=columns)

    first_pass = chunks()  # validates spec and files before anything is fitted
    if encoder is None:
        encoder = FeatureEncoder(kind, min_count=min_count, num_buckets=num_buckets, seed=seed).fit(first_pass)
    first_pass.close()  # a hash encoder stops after the first chunk; release the open file now
    data = encoder.transform(chunks())
    return (data, encoder) if return_encoder else data
