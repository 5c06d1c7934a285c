"""The native criteo hasher and the on-disk encoded cache (issue 16).

Each test names the mutation it catches."""
import gzip
import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest

from fastkd.data import FeatureEncoder, MalformedRowsWarning, cached_split, iter_table, load, open_cache
from fastkd.data import loading
from fastkd.data.readers import native
from fastkd.train.manifest import CorruptArtifactError

pytestmark = pytest.mark.skipif(not native.native_available(), reason="native hashing extension not built")

_CAT = ["68fd1e64", "", "0b153874", "a73ee510", "", "3b08e48b"] * 5


def _line(label="1", ints=None, cats=None) -> str:
    ints = ints if ints is not None else ["1", "", "5", "0", "1382", "4", "15", "2", "181", "1", "2", "", "2"]
    cats = cats if cats is not None else _CAT[:26]
    return "\t".join([label] + ints + cats)


def _tricky_lines():
    """Lines the fast path decides, lines it must leave to Python, and malformed ones."""
    rng = np.random.default_rng(0)
    good = []
    for i in range(300):
        ints = [str(int(v)) if rng.random() > 0.2 else "" for v in rng.lognormal(1, 2, 13)]
        cats = [f"{int(v):08x}" if rng.random() > 0.1 else "" for v in rng.integers(0, 2**32, 26)]
        good.append(_line(str(i % 2), ints, cats))
    odd = [
        _line(ints=["1.5", "1e3", "-0", "+3", " 4", "-7", "12345678901234567", "3", "", "", "", "", "2"]),  # numbers
        _line(cats=["café"] + _CAT[1:26]),               # non-ASCII: Python decides
        _line(cats=["a\rb"] + _CAT[1:26]),               # a '\r' inside a field
        _line(label="1.0"), _line(label="-1"),           # labels the reader accepts
        _line(label="2"), _line(label="x"),              # malformed labels
        "\t".join(["1"] + ["3"] * 20),                   # wrong column count
        _line(ints=["abc"] + ["1"] * 12),                # non-numeric integer field
        _line(ints=["inf"] + ["1"] * 12),                # non-finite
        "",                                              # empty line: skipped, still numbered
        _line() + "\r",                                  # CRLF
    ]
    lines = good[:100] + odd + good[100:]
    return lines


def _write(path, lines, gz=False, bom=False):
    data = ("\ufeff" if bom else "") + "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt", encoding="utf-8", newline="") as fh:
            fh.write(data)
    else:
        with open(path, "w", encoding="utf-8", newline="") as fh:
            fh.write(data)
    return str(path)


def _python_load(spec, enc, monkeypatch, **kw):
    with monkeypatch.context() as m:
        m.setattr(loading, "native_available", lambda: False)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            return load(spec, encoder=enc, **kw)


@pytest.mark.parametrize("gz,bom,columns", [(False, False, None), (True, True, None),
                                            (False, False, ["I3", "C1", "C26", "I13"])])
def test_native_equals_python_reader(tmp_path, monkeypatch, gz, bom, columns):
    # mutations caught: a numeric token rule, a seed or bucket off by one, a fallback row not
    # replaced or dropped, a lost line number, BOM/CRLF handling, column selection
    path = _write(tmp_path / ("c.txt.gz" if gz else "c.txt"), _tricky_lines(), gz=gz, bom=bom)
    spec = f"criteo:{path}"
    enc = FeatureEncoder("hash", num_buckets=[1000 + 7 * f for f in range(39 if columns is None else 4)], seed=3)
    enc.fit(iter_table(spec, columns=columns))
    ref = _python_load(spec, enc, monkeypatch, columns=columns, max_bad_rows=20)
    with pytest.warns(MalformedRowsWarning):
        got = load(spec, encoder=enc, columns=columns, max_bad_rows=20)
    np.testing.assert_array_equal(got.ids, ref.ids)
    np.testing.assert_array_equal(got.labels, ref.labels)
    assert got.read_report == ref.read_report
    bad = 5 if columns is None else 3  # I1's 'abc' and 'inf' are not read when I1 is not selected
    assert got.read_report.malformed == bad and len(got) == 311 - bad


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_threads_and_small_blocks_agree(tmp_path, threads):
    # mutations caught: a thread range that splits a line, rows written at the wrong offset, line
    # numbers not carried across blocks
    lines = _tricky_lines() * 20
    path = _write(tmp_path / "c.txt", lines)
    enc = FeatureEncoder("hash", num_buckets=50).fit(iter_table(f"criteo:{path}"))
    whole = list(native.iter_criteo_hashed([path], enc, num_threads=1, block_bytes=1 << 30))
    small = list(native.iter_criteo_hashed([path], enc, num_threads=threads, block_bytes=4096))
    assert len(small) > 10
    cat = lambda bs, i: np.concatenate([b[i] for b in bs])  # noqa: E731
    np.testing.assert_array_equal(cat(small, 0), cat(whole, 0))
    np.testing.assert_array_equal(cat(small, 1), cat(whole, 1))
    lines_bad = sorted(no for b in small for _, no, _ in b[2].first_bad)
    assert lines_bad[:3] == sorted(no for _, no, _ in whole[0][2].first_bad)[:3]


def _criteo_file(tmp_path, rows=600):
    from fastkd.data.criteo_like import write_criteo_like
    return str(write_criteo_like(tmp_path / "c.txt.gz", rows, max_values=40, progress=False))


@pytest.mark.parametrize("kind", ["hash", "vocab"])
def test_cached_split_equals_in_memory_split(tmp_path, kind):
    # mutation caught: the split layout (a wrong permutation or part boundary) or the label file
    path = _criteo_file(tmp_path)
    kw = dict(kind=kind, num_buckets=100) if kind == "hash" else dict(kind=kind, min_count=2)
    parts, enc, folder = cached_split(f"criteo:{path}", tmp_path / "cache", (0.7, 0.2, 0.1), 5, **kw)
    ref = load(f"criteo:{path}", **kw).split((0.7, 0.2, 0.1), seed=5)
    for a, b in zip(parts, ref):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert isinstance(a.ids.base, np.memmap) or isinstance(a.ids, np.memmap)
    assert enc.field_sizes == parts[0].field_sizes
    assert parts[0].read_report.rows_ok == 600
    # reused: the same folder, no rebuild
    mtime = os.stat(folder / "ids.npy").st_mtime_ns
    parts2, _, folder2 = cached_split(f"criteo:{path}", tmp_path / "cache", (0.7, 0.2, 0.1), 5, **kw)
    assert folder2 == folder and os.stat(folder / "ids.npy").st_mtime_ns == mtime
    # another setting: another folder
    _, _, folder3 = cached_split(f"criteo:{path}", tmp_path / "cache", (0.7, 0.2, 0.1), 6, **kw)
    assert folder3 != folder


def test_cached_split_with_a_cut_off_last_line(tmp_path):
    # mutation caught: an encoded block with no good row (here the cut-off last line, read by the
    # Python rule on its own) written as a zero-size memoryview: TypeError, no cache
    good = [_line(str(i % 2), cats=[f"{i * 7919 + f:08x}" for f in range(26)]) for i in range(200)]
    path = tmp_path / "cut.txt"
    path.write_text("\n".join(good + [_line()[:25]]))  # cut mid-line: no final newline
    kw = dict(kind="hash", num_buckets=50)
    with pytest.warns(UserWarning, match="malformed"):
        parts, _, _ = cached_split(f"criteo:{path}", tmp_path / "cache", (0.8, 0.1, 0.1), 0, **kw)
    with pytest.warns(UserWarning, match="malformed"):
        ref = load(f"criteo:{path}", **kw).split((0.8, 0.1, 0.1), seed=0)
    assert sum(len(p) for p in parts) == 200
    for a, b in zip(parts, ref):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.labels, b.labels)


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest"])
def test_damaged_cache_is_rebuilt_not_used(tmp_path, damage):
    # mutation caught: a checksum or size check skipped on open
    path = _criteo_file(tmp_path)
    parts, _, folder = cached_split(f"criteo:{path}", tmp_path / "cache", kind="hash", num_buckets=100)
    want = parts[0].ids.copy()
    del parts
    f = folder / ("manifest.json" if damage == "manifest" else "ids.npy")
    raw = bytearray(f.read_bytes())
    if damage == "flip":
        raw[-9] ^= 0xFF
    else:
        raw = raw[:len(raw) // 2]
    f.write_bytes(bytes(raw))
    with pytest.raises(CorruptArtifactError, match="ids.npy|manifest.json"):
        open_cache(folder)
    with pytest.warns(UserWarning, match="rebuilding"):
        parts, _, folder2 = cached_split(f"criteo:{path}", tmp_path / "cache", kind="hash", num_buckets=100)
    assert folder2 == folder
    np.testing.assert_array_equal(parts[0].ids, want)


_BUILD = """
import sys
from fastkd.data import encoded_cache
from fastkd.data.readers import native
real = native.iter_criteo_hashed
def slow(*a, **k):
    for i, block in enumerate(real(*a, **k, block_bytes=4096)):
        yield block
        if i == 2:
            print("mid-build", flush=True)
            import time; time.sleep(60)
import fastkd.data.loading as loading
loading.iter_criteo_hashed = slow
encoded_cache.cached_split("criteo:" + sys.argv[1], sys.argv[2], kind="hash", num_buckets=100)
"""


def test_interrupted_build_leaves_nothing_a_later_run_uses(tmp_path):
    # mutation caught: writing into the final folder directly (a killed build would leave a
    # folder with files; the later call would open it)
    path = _criteo_file(tmp_path, rows=3000)
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", _BUILD, path, str(cache)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "mid-build"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = list(cache.iterdir())
    assert left and all(".tmp-" in p.name for p in left)  # only the dead build's temporary folder
    parts, _, folder = cached_split(f"criteo:{path}", cache, kind="hash", num_buckets=100)
    assert sum(len(p) for p in parts) == 3000
    assert [p.name for p in cache.iterdir()] == [folder.name]  # the stale temporary folder was removed


def test_cli_cache_dir_gives_the_in_memory_results(tmp_path):
    # mutation caught: the CLI building its splits differently from the cache (other rows, other
    # seed) or ignoring --cache-dir
    import json

    from fastkd.cli import main
    path = _criteo_file(tmp_path, rows=1500)
    common = ["distill", "--data", f"criteo:{path}", "--encoder", "hash", "--num-buckets", "64", "--teachers", "dnn",
              "--student", "dnn", "--max-epochs", "1", "--seeds", "1", "--threads", "1", "--hidden-units", "16",
              "--batch-size", "256"]
    assert main(common + ["--out", str(tmp_path / "a"), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert main(common + ["--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [(r["model"], r["auc"], r["logloss"]) for r in a] == [(r["model"], r["auc"], r["logloss"]) for r in b]
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert "memory-mapped cache" in (tmp_path / "a" / "report.md").read_text()


def test_steps_per_epoch_caps_batches_but_shuffles_every_row():
    # mutation caught: the cap ignored (every batch trained), or the permutation cut to the first
    # rows instead of the batches
    import torch

    from fastkd.data import make_synthetic
    from fastkd.models import build_model
    from fastkd.train import TrainConfig, train_model

    train, valid = make_synthetic(3000, seed=1).split((0.8, 0.2), seed=0)
    torch.manual_seed(0)
    model = build_model("dnn", train.field_sizes, embed_dim=4, hidden_units=(8,))
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()) if m.training else None)
    summary = train_model(model, train, valid, TrainConfig(max_epochs=2, batch_size=100, steps_per_epoch=3,
                                                           progress=False))
    assert len(seen) == 6 and all(len(b) == 100 for b in seen)
    assert summary["history"][0]["samples_per_s"] > 0
    rows = {tuple(r) for b in seen for r in b.tolist()}
    first = {tuple(r) for r in train.ids[:300].tolist()}
    assert rows != first  # batches drawn from the shuffle of all 2,400 rows, not the first 300
    with pytest.raises(ValueError, match="steps_per_epoch"):
        TrainConfig(steps_per_epoch=0)
