"""One-call loading: spec -> encoded :class:`CTRData` (:func:`load`)."""
from __future__ import annotations

import sys
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from .encoder import FeatureEncoder
from .readers import DEFAULT_MAX_BAD_ROWS, ReadReport, iter_table, parse_spec
from .readers.native import iter_criteo_hashed, native_available
from .readers.report import check_max_bad_rows, check_report
from .segmented import make_segmented
from .synthetic import make_synthetic
from .table import CTRData

__all__ = ["load"]


def load(spec: str, *, encoder: Optional[FeatureEncoder] = None, kind: str = "vocab", min_count: int = 1,
         num_buckets=None, seed: int = 0, strict: bool = False, label: Optional[str] = None,
         numeric: Iterable[str] = (), columns: Optional[Sequence[str]] = None, chunk_rows: int = 200_000,
         return_encoder: bool = False, sharded: bool = False,
         max_bad_rows: Union[int, float] = DEFAULT_MAX_BAD_ROWS
         ) -> Union[CTRData, Tuple[CTRData, Optional[FeatureEncoder]]]:
    """Read and encode a data source in two streaming passes (fit, then transform).

    Only encoded ids of the whole source are held in memory, never all raw strings at once.

    Nothing is dropped silently: the returned data's :attr:`~CTRData.read_report` holds the whole
    read's :class:`~fastkd.data.ReadReport` (rows read and kept, malformed rows skipped, the first
    five as ``(file, line, reason)``), and skipped rows raise a
    :class:`~fastkd.data.MalformedRowsWarning` that says as much. A read that cannot be trusted
    stops with a ``ValueError`` naming the files, before anything is encoded: no data row (empty
    or header-only files), no well-formed row (most likely the wrong kind, e.g. a Criteo TSV read
    as libfm), or more malformed rows than ``max_bad_rows``.

    With ``sharded=True`` under ``torch.distributed`` (a process group of ``W > 1`` ranks; the
    ``fastkd`` CLI asks for it under torchrun) the work is sharded: each rank reads, parses and encodes only its share of the source (``iter_table(shard=(rank, W))``:
    every ``W``-th block of ``chunk_rows`` lines, or parquet row group), a vocabulary is fitted
    on the sum of the ranks' counts, and the encoded ids are all-gathered in source order. Every
    rank gets the same :class:`CTRData` and encoder, identical to a single-process load; no rank
    parses or holds the raw strings of the whole source (text files are still scanned for line
    ends). Errors (a malformed row with ``strict``, a bad file) are raised on every rank, naming
    the rank that hit them. This is a collective: all ranks must call it with the same arguments.

    ``spec`` may also be ``"synthetic"`` or ``"synthetic:N"``: :func:`make_synthetic` with
    ``n_samples=N`` (default 200,000) and ``seed``, or ``"segmented[:N]"``:
    :func:`~fastkd.data.segmented.make_segmented` (default 100,000 rows); no encoder is involved
    (``None`` is returned for it).

    Args:
        spec: ``KIND:PATH[,PATH2,...]`` (see :func:`~fastkd.data.iter_table`), ``synthetic[:N]`` or
            ``segmented[:N]``.
        encoder: an already fitted encoder to reuse (e.g. the training set's for a test set); if
            None a new ``FeatureEncoder(kind, min_count, num_buckets, seed)`` is fitted on this source.
        kind, min_count, num_buckets, seed: settings of the new encoder.
        strict, label, numeric, columns, chunk_rows: passed to :func:`~fastkd.data.iter_table`
            (``strict=True`` raises on the first malformed row, naming its file and line).
        max_bad_rows: most malformed rows let through (skipped, with the warning): an int is a
            count, a float in ``[0, 1]`` a fraction of the rows read (default 0.01: 1 %); above it
            ``ValueError`` names the files, the count and the limit. ``0`` refuses any malformed row
            but, unlike ``strict``, reads the whole source first and reports them all.
        return_encoder: also return the encoder.
        sharded: share the reading between the ranks of the initialised process group (see
            above; raises without one). Off by default: a sharded load is a collective that every
            rank must enter, so code that loads on one rank only keeps working.

    Returns:
        :class:`CTRData` (with :attr:`~CTRData.read_report`), or ``(CTRData, encoder)`` with
        ``return_encoder=True``.

    Raises:
        ValueError: a bad spec or argument, no data row, no well-formed row, more malformed rows
            than ``max_bad_rows``, or (``strict``) a malformed row.
        FileNotFoundError: a path does not exist.

    Example:
        >>> train, enc = load("criteo:criteo_train.txt.gz", min_count=2, return_encoder=True)  # doctest: +SKIP
        >>> test = load("criteo:criteo_test.txt.gz", encoder=enc)                              # doctest: +SKIP
    """
    generator = spec.strip().lower().split(":", 1)[0] if isinstance(spec, str) else None
    if generator in ("synthetic", "segmented"):
        _, _, n = spec.partition(":")
        try:
            n_samples = int(n) if n.strip() else (200_000 if generator == "synthetic" else 100_000)
        except ValueError:
            raise ValueError(f"spec {spec!r}: expected '{generator}' or '{generator}:N' with an integer N") from None
        make = make_synthetic if generator == "synthetic" else make_segmented
        data = make(n_samples=n_samples, seed=seed)
        return (data, None) if return_encoder else data

    max_bad_rows = check_max_bad_rows(max_bad_rows)
    if sharded and not _group_initialized():
        raise RuntimeError("load(sharded=True) needs an initialised torch.distributed process group "
                           "(fastkd.distributed.init_process_group())")
    world, rank = _process_group()
    if sharded and world > 1:
        return _load_sharded(spec, encoder, rank, world, return_encoder,
                             dict(kind=kind, min_count=min_count, num_buckets=num_buckets, seed=seed),
                             dict(chunk_rows=chunk_rows, strict=strict, label=label, numeric=numeric,
                                  columns=columns), max_bad_rows)

    def chunks(rows=chunk_rows):
        return iter_table(spec, chunk_rows=rows, strict=strict, label=label, numeric=numeric,
                          columns=columns)

    # validates spec and files before anything is fitted; a hash encoder needs only the field
    # names, from a first chunk kept small (its raw tokens are Python strings: ~2 KiB a row)
    first_pass = _Checked(chunks(_fit_chunk_rows(encoder, kind, chunk_rows)), spec, max_bad_rows)
    if encoder is None:
        encoder = FeatureEncoder(kind, min_count=min_count, num_buckets=num_buckets, seed=seed).fit(first_pass)
    first_pass.close()  # a hash encoder stops after the first chunk; release the open file now
    if not strict and _native_path(spec, encoder):
        checked = _Checked(encoded_blocks(spec, encoder, dict(chunk_rows=chunk_rows, label=label, numeric=numeric,
                                                              columns=columns)), spec, max_bad_rows)
        blocks = list(checked)
        checked.warn()
        F = len(encoder.field_names)
        data = CTRData(np.concatenate([b.ids for b in blocks]) if blocks else np.empty((0, F), np.int64),
                       np.concatenate([b.labels for b in blocks]) if blocks else np.empty(0, np.float32),
                       encoder.field_names, encoder.field_sizes, read_report=checked.report)
        return (data, encoder) if return_encoder else data
    second_pass = _Checked(chunks(), spec, max_bad_rows)
    data = encoder.transform(second_pass)
    data.read_report = second_pass.report
    second_pass.warn()
    return (data, encoder) if return_encoder else data


def _fit_chunk_rows(encoder: Optional[FeatureEncoder], kind: str, chunk_rows: int) -> int:
    """Rows per chunk of the fitting pass: a hash encoder (or a given one) reads one small chunk."""
    return chunk_rows if encoder is None and kind == "vocab" else min(chunk_rows, 1000)


def _native_path(spec: str, encoder: FeatureEncoder) -> bool:
    """Whether :func:`encoded_blocks` takes the native criteo hasher for this source and encoder."""
    return parse_spec(spec)[0] == "criteo" and encoder.kind == "hash" and native_available()


class EncodedBlock(NamedTuple):
    """Encoded rows of one block of a source, with the block's read report."""
    ids: np.ndarray
    labels: np.ndarray
    report: ReadReport


def encoded_blocks(spec: str, encoder: FeatureEncoder, read: dict):
    """:class:`EncodedBlock` per block of ``spec`` encoded by the fitted ``encoder``: the native
    criteo hasher (:func:`~fastkd.data.readers.native.iter_criteo_hashed`) where it applies, else
    the reader's chunks through ``encoder.transform``. Same rows, ids and reports either way; wrap
    it in ``_Checked`` for the checks a whole read gets."""
    if _native_path(spec, encoder):
        for ids, labels, report in iter_criteo_hashed(parse_spec(spec)[1], encoder, read.get("columns")):
            yield EncodedBlock(ids, labels, report)
        return
    for t in iter_table(spec, **read):
        d = encoder.transform(t)
        yield EncodedBlock(d.ids, d.labels, t.report)


class _Checked:
    """One pass over a source's chunks or encoded blocks (an iterator of items with a ``report``),
    adding up their reports. At the end of the
    source it raises (:func:`~fastkd.data.readers.raw.check_report`) if the read cannot be trusted,
    so an empty, wrong-kind or too-malformed source fails before it is fitted or encoded."""

    def __init__(self, chunks, spec: str, max_bad_rows) -> None:
        self.chunks = chunks
        self.kind, self.paths = parse_spec(spec)
        self.max_bad_rows = max_bad_rows
        self.report = ReadReport()
        self._it = self._pass()

    def _pass(self):
        for t in self.chunks:
            self.report = self.report.merge(t.report)
            yield t
        check_report(self.report, self.kind, self.paths, self.max_bad_rows, warn=False)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def warn(self) -> None:
        """The warning for the rows skipped (load()'s caller is 4 frames up)."""
        check_report(self.report, self.kind, self.paths, self.max_bad_rows, stacklevel=4)

    def close(self) -> None:
        self._it.close()
        self.chunks.close()


def _group_initialized() -> bool:
    # No torch imported means no process group: data loading stays torch-free in one process.
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def _process_group() -> Tuple[int, int]:
    """(world size, rank) of the default process group, (1, 0) without one."""
    if not _group_initialized():
        return 1, 0
    from .. import distributed as _dist
    return _dist.get_world_size(), _dist.get_rank()


def _collective(step, what: str):
    """Run ``step()`` on every rank; if any rank raised, raise on all of them (no rank is left
    waiting in the next collective). The failing rank re-raises its own exception."""
    from .. import distributed as _dist
    try:
        result, error = step(), None
    except Exception as exc:  # noqa: BLE001 - re-raised below on this rank, reported on the others
        result, error = None, exc
    errors = _dist.all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for r, e in enumerate(errors):
        if e is not None:
            raise RuntimeError(f"sharded load: rank {r} failed while {what}: {e}")
    return result


def _fit_from_parts(encoder: FeatureEncoder, parts, spec) -> FeatureEncoder:
    """Fit ``encoder`` on the ranks' ``(names, counts)``: the counts of disjoint shards add up."""
    names = next((n for n, _ in parts if n is not None), None)
    if names is None:  # no rank read a chunk: the no-data error
        kind, paths = parse_spec(spec)
        check_report(ReadReport(), kind, paths, 0)
    totals = None
    for n, counts in parts:
        if n is None:
            continue
        if n != names:
            raise ValueError(f"sharded load: ranks read different fields ({n} vs {names})")
        if totals is None:
            totals = counts
        else:
            for total, c in zip(totals, counts):
                total.update(c)
    return encoder._fit_counts(names, totals)


def _load_sharded(spec, encoder, rank: int, world: int, return_encoder: bool, enc_args: dict,
                  read_args: dict, max_bad_rows):
    import torch

    from .. import distributed as _dist

    def chunks():
        return iter_table(spec, shard=(rank, world), **read_args)

    if encoder is None:
        encoder = FeatureEncoder(**enc_args)

        def count():
            it = chunks()
            try:
                return encoder._count(it)
            finally:
                it.close()

        # Rank 0 alone sums the counts and fits; the others get the fitted vocabulary, not W
        # copies of everyone's counts. Its outcome (state or error) reaches every rank.
        parts = _dist.gather_object(_collective(count, "reading for the encoder"))
        outcome = None
        if rank == 0:
            try:
                outcome = (_fit_from_parts(encoder, parts, spec).state_dict(), None)
            except Exception as exc:  # noqa: BLE001 - raised on every rank below
                outcome = (None, exc)
        state, error = _dist.broadcast_object(outcome)
        if error is not None:
            raise error
        encoder.load_state_dict(state)

    def encode():
        keys, blocks, labels = [], [], []
        for t in chunks():
            d = encoder.transform(t)
            keys.append((t.chunk, len(d), t.report))
            blocks.append(d.ids)
            labels.append(d.labels)
        F = len(encoder.field_names)
        ids = np.concatenate(blocks) if blocks else np.empty((0, F), dtype=np.int64)
        lab = np.concatenate(labels) if labels else np.empty(0, dtype=np.float32)
        return keys, ids, lab

    keys, ids, lab = _collective(encode, "encoding its shard")
    all_keys = _dist.all_gather_object(keys)
    # The whole read's report, its chunks in source order: the same on every rank, so every rank
    # raises the same error; rank 0 alone warns.
    report = ReadReport()
    for _, rep in sorted((key, rep) for ks in all_keys for key, _, rep in ks):
        report = report.merge(rep)
    check_report(report, *parse_spec(spec), max_bad_rows, warn=rank == 0, stacklevel=4)
    all_keys = [[(key, n) for key, n, _ in ks] for ks in all_keys]
    all_ids = _dist.all_gather_uneven(torch.from_numpy(ids))
    all_lab = _dist.all_gather_uneven(torch.from_numpy(lab))
    # Put the chunks back in source order: (chunk position, rank, offset in that rank's block).
    order: List[Tuple[Tuple[int, int], int, int, int]] = []
    for r, ks in enumerate(all_keys):
        offset = 0
        for key, n in ks:
            order.append((key, r, offset, n))
            offset += n
    order.sort()
    if not order:
        raise ValueError(f"no rows in {spec!r}")
    data = CTRData(np.concatenate([all_ids[r][a:a + n].numpy() for _, r, a, n in order]),
                   np.concatenate([all_lab[r][a:a + n].numpy() for _, r, a, n in order]),
                   encoder.field_names, encoder.field_sizes, read_report=report)
    return (data, encoder) if return_encoder else data
