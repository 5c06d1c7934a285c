"""``fastkd.data.criteo_like``: Criteo-shaped files the criteo reader loads, deterministic per seed,
with a label the planted fields predict, and never half-written.

Mutations that fail these tests: drop a categorical column from ``_lines`` (the reader refuses
the rows); seed the rows' generator from the clock (bytes differ); drop the planted weights from
the logit (held-out AUC ~0.5); write to ``path`` directly instead of ``atomic_write`` (the
interrupted write leaves a file).
"""
import gzip

import numpy as np
import pytest

from fastkd.data import load
from fastkd.data.criteo_like import N_CAT, N_INT, main, write_criteo_like
from fastkd.metrics import roc_auc


def test_rows_load_as_criteo_and_bytes_repeat_per_seed(tmp_path):
    a = write_criteo_like(tmp_path / "a.txt.gz", 3000, max_values=100)
    b = write_criteo_like(tmp_path / "b.txt.gz", 3000, max_values=100)
    c = write_criteo_like(tmp_path / "c.txt", 3000, max_values=100, seed=1)
    assert gzip.decompress(a.read_bytes()) == gzip.decompress(b.read_bytes())
    assert c.read_bytes() != gzip.decompress(a.read_bytes())
    data = load(f"criteo:{a}", max_bad_rows=0)
    assert len(data) == 3000 and data.num_fields == N_INT + N_CAT
    assert 0.15 < data.labels.mean() < 0.4
    assert max(data.field_sizes[N_INT:]) <= 100 + 2  # max_values, plus the missing / unseen ids


def test_planted_fields_predict_the_label(tmp_path):
    data = load(f"criteo:{write_criteo_like(tmp_path / 'c.txt.gz', 20000, max_values=200)}")
    y, n = data.labels, len(data) // 2
    score = np.zeros(len(data) - n)
    for f in (N_INT + 0, N_INT + 1, N_INT + 2):  # C1..C3 carry first-order signal
        ids = data.ids[:, f]
        cnt = np.bincount(ids[:n], minlength=ids.max() + 1)
        pos = np.bincount(ids[:n], weights=y[:n], minlength=ids.max() + 1)
        ctr = (pos + 2.5) / (cnt + 10)
        score += np.log(ctr[ids[n:]] / (1 - ctr[ids[n:]]))
    assert roc_auc(y[n:], score) > 0.65


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    import fastkd.data.criteo_like as C

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "_lines", boom)
    with pytest.raises(KeyboardInterrupt):
        write_criteo_like(tmp_path / "x.txt.gz", 10)
    assert list(tmp_path.iterdir()) == []


def test_command_and_bad_arguments(tmp_path, capsys):
    assert main(["--rows", "50", "--out", str(tmp_path / "m.txt"), "--max-values", "10"]) == 0
    assert len((tmp_path / "m.txt").read_text().splitlines()) == 50
    assert main(["--rows", "0", "--out", str(tmp_path / "z.txt")]) == 2
    assert "rows must be >= 1" in capsys.readouterr().err
