"""Synthetic CTR data whose segments follow different interaction structures (:func:`make_segmented`).

A per-sample teacher gate can only beat plain averaging where teachers are best on different
rows. Here field ``segment`` picks, per row, which hidden structure makes the click:

* ``"pairwise"``: field-pair dot products ``Σ_(f,g) <v_f, v_g>`` over every pair of a few
  fields, what an FM layer computes (DeepFM's FM part, xDeepFM's CIN) and what MLPs and DCN's
  rank-one crosses learn slowly;
* ``"cross"``: the product of three additive scores ``Π_t Σ_f u_tf`` over the active fields, a
  degree-3 cross that DCN's cross layers and xDeepFM's CIN compute and an FM cannot;
* ``"deep"``: a random two-layer tanh network of per-value vectors (only MLP parts fit it);
* ``"mf"``: one dot product of the two largest fields' vectors (user × item);
* ``"periodic"``: sines of additive per-value scores, which no low-degree polynomial fits.

Each structure's logit is scaled to unit standard deviation, plus a weak shared first-order
term and noise; each segment's bias gives the same click rate. The report of
``fastkd demo --synthetic segmented`` shows every teacher's test AUC per segment.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .synthetic import _fit_bias, _popularity_scale, _sample_ids, default_cardinalities
from .table import CTRData

__all__ = ["make_segmented", "STRUCTURES"]

STRUCTURES = ("pairwise", "mf", "cross", "deep", "periodic")


class _Structure:
    """One segment's hidden logit over the feature fields."""

    def __init__(self, kind: str, rng: np.random.Generator, cards: Sequence[int], scale, active: Sequence[int],
                 rank: int) -> None:
        self.kind = kind
        self.active = list(active)
        if kind == "pairwise":
            self.v = {f: rng.standard_normal((cards[f], rank)) * scale[f][:, None] for f in self.active}
        elif kind == "mf":
            self.active = [0, 1]  # the two largest fields (sizes are in decreasing order)
            self.v = {f: rng.standard_normal((cards[f], rank)) * scale[f][:, None] for f in self.active}
        elif kind == "cross":
            self.a = [{f: rng.standard_normal(cards[f]) * scale[f] for f in self.active} for _ in range(3)]
        elif kind == "deep":
            self.e = {f: rng.standard_normal((cards[f], rank)) * scale[f][:, None] for f in self.active}
            width = rank * len(self.active)
            self.w1 = rng.standard_normal((width, 32)) * 1.5 / np.sqrt(width)
            self.w2 = rng.standard_normal(32) / np.sqrt(32)
        elif kind == "periodic":
            self.c = [{f: rng.standard_normal(cards[f]) * scale[f] for f in self.active} for _ in range(4)]
        else:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {kind!r}")

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        if self.kind == "pairwise":
            vecs = [self.v[f][ids[:, f]] for f in self.active]
            total = np.sum(vecs, axis=0)
            # sum over pairs f < g of <v_f, v_g> = (|Σ v|² − Σ |v|²) / 2
            return 0.5 * ((total ** 2).sum(1) - sum((x ** 2).sum(1) for x in vecs))
        if self.kind == "mf":
            return (self.v[0][ids[:, 0]] * self.v[1][ids[:, 1]]).sum(1)
        if self.kind == "cross":
            # product of three additive scores: a degree-3 cross of the embeddings
            return np.prod([sum(a[f][ids[:, f]] for f in self.active) for a in self.a], axis=0)
        if self.kind == "deep":
            x = np.concatenate([self.e[f][ids[:, f]] for f in self.active], axis=1)
            return np.tanh(x @ self.w1) @ self.w2
        # periodic in additive scores: no polynomial of low degree fits it, an MLP can
        k = np.sqrt(len(self.active))
        return sum(np.sin(2.5 * sum(c[f][ids[:, f]] for f in self.active) / k) for c in self.c)


def make_segmented(n_samples: int = 100_000, seed: int = 0, *, structures: Sequence[str] = ("mf", "deep"),
                   n_fields: int = 8, max_cardinality: int = 2000, min_cardinality: int = 10,
                   active_fields: int = 5, rank: int = 8, zipf_exponent: float = 1.1, tail_decay: float = 0.5,
                   strength: float = 3.0, first_order: float = 0.3, noise: float = 0.3,
                   positive_rate: float = 0.3, calibration_rows: int = 20_000,
                   segment_probs: Optional[Sequence[float]] = None) -> CTRData:
    """Synthetic CTR rows from segments with different interaction structures.

    Field 0, ``segment``, holds the row's segment ``s`` (``len(structures)`` values); fields
    ``f1..f{n_fields}`` are categorical with power-law sizes and Zipf frequencies as in
    :func:`~fastkd.data.make_synthetic`. Segment ``s`` draws its click from
    ``σ(b_s + strength·z_s + first_order·z1 + noise·ε)``: ``z_s`` is structure ``structures[s]``
    (see the module docstring) over ``active_fields`` randomly chosen fields, its own parameters,
    scaled to unit std; ``z1`` a shared first-order term; ``b_s`` sets the click rate to
    ``positive_rate`` in every segment. Deterministic in ``seed`` and the knobs, not ``n_samples``.

    Args:
        n_samples: rows.
        seed: seed of everything.
        structures: one structure per segment, from :data:`STRUCTURES` (repeats allowed).
        n_fields: feature fields besides ``segment``.
        max_cardinality, min_cardinality: field sizes (geometric between them).
        active_fields: fields each segment's structure reads (3 or more).
        rank: factor width of the pairwise and deep structures.
        zipf_exponent, tail_decay: value-frequency skew and how fast rare values' effects shrink.
        strength, first_order, noise: logit std of the structure, the shared term and the noise.
        positive_rate: click rate in every segment, in (0, 1).
        calibration_rows: rows per segment that standardise the structures and fit the biases.
        segment_probs: segment frequencies (default uniform).

    Returns:
        :class:`CTRData` with fields ``segment, f1, ...``.

    Example:
        >>> data = make_segmented(5000, seed=0)
        >>> data.field_names[:2], data.field_sizes[0]
        (['segment', 'f1'], 2)
    """
    if not isinstance(n_samples, (int, np.integer)) or n_samples < 0:
        raise ValueError(f"n_samples must be a non-negative int, got {n_samples!r}")
    structures = list(structures)
    if not structures or any(s not in STRUCTURES for s in structures):
        raise ValueError(f"structures must be a non-empty list from {STRUCTURES}, got {structures!r}")
    if not 3 <= active_fields <= n_fields:
        raise ValueError(f"need 3 <= active_fields <= n_fields, got {active_fields} and {n_fields}")
    if not 0.0 < positive_rate < 1.0:
        raise ValueError(f"positive_rate must be in (0, 1), got {positive_rate}")
    for name, val in (("strength", strength), ("first_order", first_order), ("noise", noise)):
        if val < 0:
            raise ValueError(f"{name} must be >= 0, got {val}")
    k = len(structures)
    probs = np.full(k, 1.0 / k) if segment_probs is None else np.asarray(segment_probs, dtype=float)
    if probs.shape != (k,) or (probs < 0).any() or abs(probs.sum() - 1.0) > 1e-6:
        raise ValueError(f"segment_probs must be {k} non-negative numbers summing to 1, got {segment_probs!r}")
    cards = default_cardinalities(n_fields, max_cardinality, min_cardinality)

    model_ss, calib_ss, data_ss, noise_ss = np.random.SeedSequence(seed).spawn(4)
    mrng = np.random.default_rng(model_ss)
    perms = [mrng.permutation(c) for c in cards]
    scale = _popularity_scale(cards, perms, tail_decay)
    w1 = [mrng.standard_normal(c) * sc for c, sc in zip(cards, scale)]
    structs = [_Structure(kind, mrng, cards, scale, np.sort(mrng.choice(n_fields, active_fields, replace=False)),
                          rank) for kind in structures]

    def first(ids):
        return sum(w[ids[:, f]] for f, w in enumerate(w1))

    # standardise each structure and the first-order term on calibration rows, then fit biases
    crng = np.random.default_rng(calib_ss)
    cal = _sample_ids(crng, calibration_rows, cards, zipf_exponent, perms)
    cal_first = first(cal)
    f_mu, f_sd = cal_first.mean(), cal_first.std() or 1.0
    norms, biases = [], []
    for st in structs:
        z = st(cal)
        mu, sd = z.mean(), z.std() or 1.0
        norms.append((mu, sd))
        logit = strength * (z - mu) / sd + first_order * (cal_first - f_mu) / f_sd
        eps = noise * crng.standard_normal(calibration_rows)
        biases.append(_fit_bias(logit + eps, positive_rate))

    drng = np.random.default_rng(data_ss)
    n = int(n_samples)
    seg = drng.choice(k, size=n, p=probs)
    feats = _sample_ids(drng, n, cards, zipf_exponent, perms)
    logit = first_order * (first(feats) - f_mu) / f_sd
    for s, (st, (mu, sd), b) in enumerate(zip(structs, norms, biases)):
        rows = seg == s
        logit[rows] += strength * (st(feats[rows]) - mu) / sd + b
    nrng = np.random.default_rng(noise_ss)
    p = 1.0 / (1.0 + np.exp(-(logit + noise * nrng.standard_normal(n))))
    labels = (nrng.random(n) < p).astype(np.float32)
    ids = np.concatenate([seg[:, None], feats], axis=1)
    return CTRData(ids, labels, ["segment"] + [f"f{i + 1}" for i in range(n_fields)], [k] + list(cards))
