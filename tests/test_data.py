"""Tests for fastkd.data: readers, encoder, CTRData, synthetic data."""
import gzip
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xxhash

ROOT = Path(__file__).resolve().parents[1]
try:  # pytest's default import mode does not put the repository root on sys.path
    import fastkd.data  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(ROOT))

from fastkd.data import (AVAZU_COLUMNS, CRITEO_CATEGORICAL, CRITEO_NUMERIC, FRAPPE_FIELDS, IPINYOU_FIELDS,  # noqa: E402
                         CTRData, FeatureEncoder, RawTable, ReadReport, bucketize_numeric, iter_table, load,
                         make_synthetic, read_table)
from fastkd.data.encoder import _hash_column  # noqa: E402

REAL = ROOT.parent / "shared" / "data"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real data not found at {REAL}")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def write(path: Path, text: str, gz: bool = False) -> str:
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return str(path)


def assert_tables_equal(a: RawTable, b: RawTable):
    assert a.field_names == b.field_names
    assert a.numeric == b.numeric
    np.testing.assert_array_equal(a.labels, b.labels)
    for ca, cb in zip(a.columns, b.columns):
        assert ca.tolist() == cb.tolist()
    assert (a.report.rows_read, a.report.rows_ok, a.report.malformed) == \
        (b.report.rows_read, b.report.rows_ok, b.report.malformed)
    assert a.report.first_bad == b.report.first_bad


def auc(y, s):
    """Rank AUC (ties averaged) without sklearn."""
    y = np.asarray(y)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    s_sorted = np.asarray(s)[order]
    # average ranks over ties
    _, first, counts = np.unique(s_sorted, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    n1 = y.sum()
    n0 = len(y) - n1
    return (ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


def criteo_line(label, ints, cats):
    assert len(ints) == 13 and len(cats) == 26
    return "\t".join([str(label)] + [str(x) for x in ints] + list(cats))


CATS = [f"{i:08x}" for i in range(26)]


# ---------------------------------------------------------------------------------------------
# criteo
# ---------------------------------------------------------------------------------------------
def test_bucketize_rule_matches_formula():
    vals = [float("nan"), -7, -1, 0, 1, 2, 2.9, 3, 4, 5, 7, 8, 100, 1e6]
    got = bucketize_numeric(np.array(vals)).tolist()
    want = []
    for x in vals:
        if math.isnan(x):
            want.append(None)
            continue
        v = int(x)
        want.append(str(int(math.floor(math.log(v) ** 2))) if v > 2 else "SP" + str(v))
    assert got == want
    assert got[:7] == [None, "SP-7", "SP-1", "SP0", "SP1", "SP2", "SP2"]
    # the SP prefix keeps raw 1 apart from bucket 1 (v = 3, 4)
    assert got[4] != got[7] == got[8] == "1"


@pytest.mark.parametrize("gz", [False, True])
def test_criteo_reader_tokens_missing_and_malformed(tmp_path, gz):
    ints = [5, "", -1, 1, 3, 100, 0, 2, 8, 1000, 7, 4, 6]
    cats = list(CATS)
    cats[3] = ""
    lines = [
        criteo_line(1, ints, cats),                        # 1 ok
        criteo_line(0, [1] * 13, CATS),                    # 2 ok
        "0\t1\t2",                                         # 3 wrong field count
        criteo_line("x", [1] * 13, CATS),                  # 4 bad label
        "",                                                # 5 empty: ignored
        criteo_line(0, [1, "abc"] + [1] * 11, CATS),       # 6 non-numeric I2
        criteo_line(2, [1] * 13, CATS),                    # 7 label not 0/1
        criteo_line(0, [""] * 13, [""] * 26),              # 8 ok, all missing
    ]
    # a gzip file with a misleading name checks detection by magic bytes
    path = write(tmp_path / "c.txt", "\n".join(lines) + "\n", gz=gz)
    t = read_table(f"criteo:{path}")
    assert t.field_names == CRITEO_NUMERIC + CRITEO_CATEGORICAL
    assert t.numeric == [True] * 13 + [False] * 26
    assert len(t) == 3
    np.testing.assert_array_equal(t.labels, [1, 0, 0])
    assert t.labels.dtype == np.float32
    row0 = [c[0] for c in t.columns]
    assert row0[:13] == ["2", None, "SP-1", "SP1", "1", "21", "SP0", "SP2", "4", "47", "3", "1", "3"]
    assert row0[13:16] == CATS[:3] and row0[16] is None and row0[17] == CATS[4]
    assert all(c[2] is None for c in t.columns)
    r = t.report
    assert (r.rows_read, r.rows_ok, r.malformed) == (7, 3, 4)
    assert [(f, line) for f, line, _ in r.first_bad] == [(path, 3), (path, 4), (path, 6), (path, 7)]
    reasons = [x[2] for x in r.first_bad]
    assert "40" in reasons[0] and "label" in reasons[1] and "I2" in reasons[2] and "label" in reasons[3]
    assert str(r).startswith("c.txt: 3 rows, 4 malformed")

    with pytest.raises(ValueError, match=r"c\.txt:3: expected 40"):
        read_table(f"criteo:{path}", strict=True)


def test_criteo_columns_selection_and_numeric_rejected(tmp_path):
    path = write(tmp_path / "c.tsv", criteo_line(1, list(range(13)), CATS) + "\n")
    t = read_table(f"criteo:{path}", columns=["C2", "I4"])
    assert t.field_names == ["C2", "I4"] and t.numeric == [False, True]
    assert [c[0] for c in t.columns] == [CATS[1], "1"]   # I4 = 3 -> floor(log(3)**2)
    with pytest.raises(ValueError, match="numeric"):
        read_table(f"criteo:{path}", numeric=["I1"])
    with pytest.raises(ValueError, match="C99"):
        read_table(f"criteo:{path}", columns=["C99"])


# ---------------------------------------------------------------------------------------------
# avazu
# ---------------------------------------------------------------------------------------------
def avazu_rows(n, start=0):
    rows = []
    for i in range(start, start + n):
        vals = [str(10_000 + i), str(i % 2), f"141021{i % 24:02d}", "1005", str(i % 3)]
        vals += [f"s{i % 5}"] * 9 + [str(i % 4), "", "15704", "320", "50", "1722", "0", "35", "-1", "79"]
        rows.append(",".join(vals))
    return rows


def test_avazu_header_and_headerless_agree(tmp_path):
    rows = avazu_rows(6)
    with_header = write(tmp_path / "train.csv", ",".join(AVAZU_COLUMNS) + "\n" + "\n".join(rows) + "\n", gz=True)
    without = write(tmp_path / "dev.csv", "\n".join(rows) + "\n")
    a = read_table(f"avazu:{with_header}")
    b = read_table(f"avazu:{without}")
    assert a.field_names == [c for c in AVAZU_COLUMNS if c not in ("id", "click")]
    assert len(a.field_names) == 22 and a.numeric == [False] * 22
    np.testing.assert_array_equal(a.labels, [0, 1, 0, 1, 0, 1])
    assert a.columns[0].tolist() == ["00", "01", "02", "03", "04", "05"]   # hour of day
    assert a.columns[a.field_names.index("device_conn_type")].tolist() == [None] * 6  # empty = missing
    for ca, cb in zip(a.columns, b.columns):
        assert ca.tolist() == cb.tolist()
    # line numbers count the header
    bad = write(tmp_path / "bad.csv", ",".join(AVAZU_COLUMNS) + "\n" + rows[0] + "\n1,2,3\n")
    t = read_table(f"avazu:{bad}")
    assert t.report.first_bad == [(bad, 3, "expected 24 fields, got 3")]
    bad2 = write(tmp_path / "bad2.csv", rows[0] + "\n" + rows[1].replace("14102101", "1410") + "\n")
    t = read_table(f"avazu:{bad2}")
    assert len(t) == 1 and t.report.first_bad[0][1] == 2 and "hour" in t.report.first_bad[0][2]


def test_multiple_paths_concatenate_in_order(tmp_path):
    p1 = write(tmp_path / "a.csv", ",".join(AVAZU_COLUMNS) + "\n" + "\n".join(avazu_rows(3)) + "\n")
    p2 = write(tmp_path / "b.csv", "\n".join(avazu_rows(2, start=3)) + "\n", gz=True)
    t = read_table(f"avazu:{p1},{p2}")
    assert len(t) == 5
    assert t.columns[0].tolist() == ["00", "01", "02", "03", "04"]
    assert t.report.files == [p1, p2]
    assert str(t.report) == "a.csv+b.csv: 5 rows, 0 malformed"
    t2 = read_table(f"avazu:{p2},{p1}")
    assert t2.columns[0].tolist() == ["03", "04", "00", "01", "02"]


# ---------------------------------------------------------------------------------------------
# libfm
# ---------------------------------------------------------------------------------------------
def test_libfm_labels_positions_and_malformed(tmp_path):
    text = "\n".join([
        "-1 3:1 10:1 20:1",        # 1
        "1 4:1 11:1 21:1",         # 2
        "",                        # 3 ignored
        "1 4:1 11:1",              # 4 too few entries
        "0 5:1 12:1 22:0.5",       # 5 ok (val ignored)
        "1 5:1 12 22:1",           # 6 entry without colon
        "yes 5:1 12:1 22:1",       # 7 bad label
        "1 :1 12:1 22:1",          # 8 empty idx
    ]) + "\n"
    path = write(tmp_path / "d.libfm", text)
    t = read_table(f"libfm:{path}")
    assert t.field_names == ["f0", "f1", "f2"]
    np.testing.assert_array_equal(t.labels, [0, 1, 0])
    assert [c.tolist() for c in t.columns] == [["3", "4", "5"], ["10", "11", "12"], ["20", "21", "22"]]
    assert [b[1] for b in t.report.first_bad] == [4, 6, 7, 8]
    assert t.report.malformed == 4 and t.report.rows_read == 7
    with pytest.raises(ValueError, match=r"d\.libfm:4: expected 3"):
        read_table(f"libfm:{path}", strict=True)
    named = read_table(f"libfm:{path}", columns=["u", "i", "c"])
    assert named.field_names == ["u", "i", "c"]
    # with explicit names the width is fixed up front
    assert read_table(f"libfm:{path}", columns=["u", "i"]).report.rows_ok == 1


def test_libfm_width_from_the_majority_of_good_lines(tmp_path):
    # the most common entry count among lines whose label parses (line 1's label does not); more
    # in tests/test_data_hardening.py
    path = write(tmp_path / "d.txt", "x 1:1 2:1 3:1 4:1\n1 1:1 2:1\n0 3:1 4:1\n1 5:1 6:1 7:1\n")
    t = read_table(f"libfm:{path}")
    assert t.field_names == ["f0", "f1"] and len(t) == 2
    assert [b[1] for b in t.report.first_bad] == [1, 4]


def test_libfm_whole_chunk_path_reports_label_lines(tmp_path):
    # structurally regular lines (CRLF, a blank line) take the whole-chunk path; a bad label must
    # still be reported with its own line number and strict must name it
    path = write(tmp_path / "d.txt", "1 1:1 2:1\r\n\r\nyes 3:1 4:1\r\n0 5:1 6:1\r\n")
    t = read_table(f"libfm:{path}", columns=["a", "b"])
    assert t.columns[0].tolist() == ["1", "5"] and t.labels.tolist() == [1, 0]
    assert t.report.first_bad == [(path, 3, "unparsable label 'yes'")]
    with pytest.raises(ValueError, match=r"d\.txt:3: unparsable label"):
        read_table(f"libfm:{path}", columns=["a", "b"], strict=True)


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 1000])
def test_chunking_matches_single_chunk(tmp_path, chunk_rows):
    rng = np.random.default_rng(0)
    lines = [f"{rng.choice(['1', '-1'])} " + " ".join(f"{f * 100 + rng.integers(5)}:1" for f in range(4))
             for _ in range(11)]
    lines[0] = "x 1:1 2:1 3:1"  # bad first line: the field count comes from the other lines
    lines[5] = "1 1:1"          # malformed in the middle: exercises the per-line path in one chunk
    path = write(tmp_path / "d.gz", "\n".join(lines) + "\n", gz=True)
    whole = read_table(f"libfm:{path}", chunk_rows=10**6)
    chunks = list(iter_table(f"libfm:{path}", chunk_rows=chunk_rows))
    assert len(chunks) == math.ceil(11 / chunk_rows)
    assert_tables_equal(RawTable.concat(chunks), whole)
    assert [b[1:] for b in whole.report.first_bad] == [(1, "unparsable label 'x'"),
                                                        (6, "expected 4 idx:val entries, got 1")]
    assert len(whole) == 9 and whole.field_names == ["f0", "f1", "f2", "f3"]

    crit = [criteo_line(i % 2, [i] * 13, CATS) for i in range(7)]
    cpath = write(tmp_path / "c.txt", "\n".join(crit) + "\n")
    assert_tables_equal(RawTable.concat(list(iter_table(f"criteo:{cpath}", chunk_rows=chunk_rows))),
                        read_table(f"criteo:{cpath}"))
    apath = write(tmp_path / "a.csv", ",".join(AVAZU_COLUMNS) + "\n" + "\n".join(avazu_rows(7)) + "\n")
    assert_tables_equal(RawTable.concat(list(iter_table(f"avazu:{apath}", chunk_rows=chunk_rows))),
                        read_table(f"avazu:{apath}"))


# ---------------------------------------------------------------------------------------------
# csv / parquet
# ---------------------------------------------------------------------------------------------
def test_csv_numeric_columns_and_tab_sniffing(tmp_path):
    text = "age,city,y,price\n30,paris,1,2.5\n,berlin,0,\n1,,1,100\nold,rome,0,1\n"
    path = write(tmp_path / "t.csv", text)
    t = read_table(f"csv:{path}", label="y", numeric=["age", "price"])
    assert t.field_names == ["age", "city", "price"] and t.numeric == [True, False, True]
    np.testing.assert_array_equal(t.labels, [1, 0, 1])
    assert t.columns[0].tolist() == ["11", None, "SP1"]         # floor(log(30)**2) = 11
    assert t.columns[1].tolist() == ["paris", "berlin", None]
    assert t.columns[2].tolist() == ["SP2", None, "21"]
    assert t.report.first_bad == [(path, 5, "field 'age': non-numeric value 'old'")]
    with pytest.raises(ValueError, match="label column 'label' not found"):
        read_table(f"csv:{path}")
    with pytest.raises(ValueError, match="zzz"):
        read_table(f"csv:{path}", label="y", numeric=["zzz"])
    tsv = write(tmp_path / "t.tsv", text.replace(",", "\t"), gz=True)
    assert_tables_equal_values(read_table(f"csv:{tsv}", label="y", numeric=["age", "price"]), t)
    sel = read_table(f"csv:{path}", label="y", columns=["city"])
    assert sel.field_names == ["city"]


def assert_tables_equal_values(a, b):
    assert a.field_names == b.field_names
    np.testing.assert_array_equal(a.labels, b.labels)
    assert [c.tolist() for c in a.columns] == [c.tolist() for c in b.columns]


def test_parquet_reader(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({
        "label": pa.array([1, 0, 1, None, 0], pa.int64()),
        "age": pa.array([30, None, 1, 5, 100], pa.int64()),
        "city": pa.array(["paris", "berlin", None, "x", ""], pa.string()),
        "code": pa.array([7, 8, None, 7, 9], pa.int32()),
        "score": pa.array([0.5, float("nan"), 1.0, 1.0, 2.0], pa.float64()),
    })
    path = str(tmp_path / "t.parquet")
    pq.write_table(table, path, row_group_size=2)
    t = read_table(f"parquet:{path}", numeric=["age"])
    assert t.field_names == ["age", "city", "code", "score"]
    assert t.numeric == [True, False, False, False]
    np.testing.assert_array_equal(t.labels, [1, 0, 1, 0])
    assert t.columns[0].tolist() == ["11", None, "SP1", "21"]
    assert t.columns[1].tolist() == ["paris", "berlin", None, None]
    assert t.columns[2].tolist() == ["7", "8", None, "9"]
    assert t.columns[3].tolist() == ["0.5", None, "1.0", "2.0"]
    assert t.report.first_bad == [(path, 4, "label 'nan' is not 0/1 or -1/1")]
    chunks = list(iter_table(f"parquet:{path}", chunk_rows=2, numeric=["age"]))
    assert len(chunks) == 3
    assert_tables_equal(RawTable.concat(chunks), t)


def test_spec_errors(tmp_path):
    path = write(tmp_path / "x.csv", "label,a\n1,b\n")
    with pytest.raises(ValueError, match="KIND:PATH"):
        read_table(path)
    with pytest.raises(ValueError, match="unknown data kind 'tsv'"):
        read_table(f"tsv:{path}")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_table(f"csv:{path},{tmp_path / 'nope.csv'}")
    with pytest.raises(ValueError, match="empty path"):
        read_table(f"csv:{path},")
    with pytest.raises(ValueError, match="chunk_rows"):
        iter_table(f"csv:{path}", chunk_rows=0)


# ---------------------------------------------------------------------------------------------
# encoder
# ---------------------------------------------------------------------------------------------
def small_table():
    a = np.array(["x", "y", "x", None, "z", "y", "x", "", "w"], dtype=object)
    b = np.array(["1", "1", "2", "2", "3", "3", None, "4", "5"], dtype=object)
    return RawTable(np.array([1, 0, 1, 0, 1, 0, 1, 0, 1]), [a, b], ["a", "b"], [False, False], ReadReport())


def test_vocab_encoder_ids_oov_min_count():
    t = small_table()
    enc = FeatureEncoder("vocab").fit(t)
    d = enc.transform(t)
    # counts a: x3 y2 z1 w1 -> x=2, y=3, then ties by value: w=4, z=5
    assert d.ids[:, 0].tolist() == [2, 3, 2, 0, 5, 3, 2, 0, 4]
    # counts b: 1,2,3 twice each -> 2,3,4; 4 and 5 once -> 5,6
    assert d.ids[:, 1].tolist() == [2, 2, 3, 3, 4, 4, 0, 5, 6]
    assert enc.field_sizes == [6, 7] and enc.field_names == ["a", "b"]
    assert d.field_sizes == [6, 7] and d.labels.dtype == np.float32

    enc2 = FeatureEncoder("vocab", min_count=2).fit(t)
    d2 = enc2.transform(t)
    assert d2.ids[:, 0].tolist() == [2, 3, 2, 0, 1, 3, 2, 0, 1]
    assert enc2.field_sizes == [4, 5]
    unseen = RawTable(np.array([0, 1]), [np.array(["q", None], object), np.array(["1", "zz"], object)],
                      ["a", "b"], [False, False])
    assert enc2.transform(unseen).ids.tolist() == [[1, 2], [0, 1]]
    with pytest.raises(ValueError, match="fields"):
        enc2.transform(RawTable(np.array([0]), [np.array(["q"], object)], ["c"], [False]))


def test_hash_encoder_matches_xxhash():
    t = small_table()
    seed, nb = 7, [11, 5]
    d = FeatureEncoder("hash", num_buckets=nb, seed=seed).fit(t).transform(t)
    for f, col in enumerate(t.columns):
        want = [0 if not v else 1 + xxhash.xxh3_64_intdigest(v.encode(), seed + f) % (nb[f] - 1) for v in col]
        assert d.ids[:, f].tolist() == want
    assert d.field_sizes == nb
    # the swappable single-column function is the one used
    assert _hash_column(np.array(["héllo", None, ""], object), 1000, 3).tolist() == \
        [1 + xxhash.xxh3_64_intdigest("héllo".encode("utf-8"), 3) % 999, 0, 0]
    with pytest.raises(ValueError, match="num_buckets"):
        FeatureEncoder("hash")
    with pytest.raises(ValueError, match="num_buckets has 3 entries"):
        FeatureEncoder("hash", num_buckets=[4, 4, 4]).fit(t)


@pytest.mark.parametrize("kind", ["vocab", "hash"])
def test_encoder_state_dict_roundtrip(kind):
    t = small_table()
    enc = FeatureEncoder(kind, min_count=1, num_buckets=64 if kind == "hash" else None, seed=3).fit(t)
    state = json.loads(json.dumps(enc.state_dict()))
    enc2 = FeatureEncoder.from_state_dict(state)
    np.testing.assert_array_equal(enc2.transform(t).ids, enc.transform(t).ids)
    assert enc2.field_sizes == enc.field_sizes and enc2.field_names == enc.field_names
    with pytest.raises(RuntimeError, match="not fitted"):
        FeatureEncoder().transform(t)


def test_streaming_fit_equals_whole_fit(tmp_path):
    rng = np.random.default_rng(1)
    lines = [f"{rng.integers(2)} " + " ".join(f"{rng.zipf(1.5) % 50 + 100 * f}:1" for f in range(3))
             for _ in range(300)]
    path = write(tmp_path / "s.libfm", "\n".join(lines) + "\n")
    spec = f"libfm:{path}"
    whole = FeatureEncoder(min_count=2).fit(read_table(spec))
    stream = FeatureEncoder(min_count=2).fit(iter_table(spec, chunk_rows=37))
    assert stream.state_dict() == whole.state_dict()
    a = whole.transform(read_table(spec))
    b = stream.transform(iter_table(spec, chunk_rows=37))
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.labels, b.labels)


# ---------------------------------------------------------------------------------------------
# CTRData
# ---------------------------------------------------------------------------------------------
def test_split_rule_is_exact():
    n = 1003
    rng = np.random.default_rng(5)
    # field "row" holds the original row number, so each part reveals which rows it took, in order
    d = CTRData(np.c_[rng.integers(0, 9, n), np.arange(n)], rng.integers(0, 2, n), ["a", "row"], [9, n])
    parts = d.split((0.8, 0.1, 0.1), seed=42)
    perm = np.random.default_rng(42).permutation(n)
    n0, n1 = int(0.8 * n), int(0.1 * n)
    assert [len(p) for p in parts] == [802, 100, 101]
    for p, rows in zip(parts, [perm[:n0], perm[n0:n0 + n1], perm[n0 + n1:]]):
        np.testing.assert_array_equal(p.ids[:, 1], rows)
        np.testing.assert_array_equal(p.labels, d.labels[rows])
    assert [len(p) for p in d.split((0.5, 0.5), seed=1)] == [501, 502]
    with pytest.raises(ValueError, match="sum to 1"):
        d.split((0.5, 0.4))


def test_ctrdata_subset_concat_and_validation():
    d = CTRData(np.array([[0, 1], [2, 0], [1, 1]]), np.array([1, 0, 1]), ["a", "b"], [3, 2])
    assert len(d) == 3 and d.ids.dtype == np.int64 and d.labels.dtype == np.float32
    assert d.subset(np.array([True, False, True])).ids.tolist() == [[0, 1], [1, 1]]
    assert d.subset(slice(1, None)).labels.tolist() == [0, 1]
    assert d.subset([2, 0]).ids.tolist() == [[1, 1], [0, 1]]
    c = CTRData.concat([d, d.subset([0])])
    assert len(c) == 4 and c.ids[-1].tolist() == [0, 1]
    with pytest.raises(ValueError, match="field_sizes"):
        CTRData.concat([d, CTRData(d.ids, d.labels, ["a", "b"], [3, 3])])
    with pytest.raises(ValueError, match="'b'"):
        CTRData(np.array([[0, 2]]), np.array([1]), ["a", "b"], [3, 2])
    with pytest.raises(ValueError, match="labels"):
        CTRData(np.array([[0, 0]]), np.array([0.5]), ["a", "b"], [3, 2])


# ---------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------
def test_synthetic_deterministic_and_fast():
    t0 = time.process_time()
    d = make_synthetic(200_000, seed=0)
    cpu = time.process_time() - t0
    assert cpu < 3.0, f"make_synthetic(200k) took {cpu:.2f}s CPU"
    assert d.ids.shape == (200_000, 12) and d.field_names == [f"f{i}" for i in range(12)]
    assert d.field_sizes[0] == 20_000 and d.field_sizes[-1] == 5
    assert np.all(d.ids.max(axis=0) < d.field_sizes)
    assert 0.20 <= d.positive_rate <= 0.35
    # Zipf-like: the most frequent value of the largest field is far above uniform
    counts = np.bincount(d.ids[:, 0])
    assert counts.max() > 500 * len(d) / d.field_sizes[0]
    a = make_synthetic(3000, seed=4)
    b = make_synthetic(3000, seed=4)
    c = make_synthetic(3000, seed=5)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.ids, c.ids)


def _lr_auc_gap(**knobs):
    """(Bayes AUC - one-hot logistic regression AUC) on held-out rows, small fields so LR is well estimated."""
    d, logit = make_synthetic(24_000, seed=3, cardinalities=[20] * 8, return_logits=True, **knobs)
    offs = np.concatenate([[0], np.cumsum(d.field_sizes)[:-1]])
    dim = 1 + sum(d.field_sizes)
    cols = np.c_[np.zeros(len(d), np.int64), 1 + d.ids + offs]   # one-hot column per field, plus a bias column
    y = d.labels.astype(np.float64)
    tr, te = slice(0, 18_000), slice(18_000, None)
    c = cols[tr]
    pair = (c[:, :, None] * dim + c[:, None, :]).reshape(len(c), -1)
    # Newton's method on the ridge-penalised log-loss; the one-hot Gram matrices come from bincount
    # (no dense matmul, which is slow on an oversubscribed machine)
    w = np.zeros(dim)
    for _ in range(12):
        p = 1.0 / (1.0 + np.exp(-w[c].sum(1)))
        grad = np.bincount(c.ravel(), np.repeat(p - y[tr], c.shape[1]), dim) + 1e-2 * w
        r = p * (1 - p)
        hess = np.bincount(pair.ravel(), np.repeat(r, pair.shape[1]), dim * dim).reshape(dim, dim)
        w -= np.linalg.solve(hess + 1e-2 * np.eye(dim), grad)
    s = w[cols[te]].sum(1)
    return auc(d.labels[te], logit[te]) - auc(d.labels[te], s)


def test_synthetic_interactions_matter():
    gap_full = _lr_auc_gap()
    gap_linear = _lr_auc_gap(pairwise=0.0, higher_order=0.0)
    # without interactions a first-order model is (nearly) Bayes-optimal; with them it clearly lags
    assert gap_linear < 0.015, gap_linear
    assert gap_full > 0.06, gap_full


def test_load_synthetic_and_encoder_reuse(tmp_path):
    d = load("synthetic:1000", seed=2)
    np.testing.assert_array_equal(d.ids, make_synthetic(1000, seed=2).ids)
    p1 = write(tmp_path / "a.csv", "label,c\n1,x\n0,y\n1,x\n")
    p2 = write(tmp_path / "b.csv", "label,c\n1,y\n0,z\n")
    train, enc = load(f"csv:{p1}", return_encoder=True)
    test = load(f"csv:{p2}", encoder=enc)
    assert train.ids[:, 0].tolist() == [2, 3, 2] and test.ids[:, 0].tolist() == [3, 1]
    assert test.field_sizes == train.field_sizes == [4]
    h = load(f"csv:{p1}", kind="hash", num_buckets=16, seed=1)
    assert h.ids[0, 0] == 1 + xxhash.xxh3_64_intdigest(b"x", 1) % 15


# ---------------------------------------------------------------------------------------------
# real data (skipped when ../shared/data is absent)
# ---------------------------------------------------------------------------------------------
@needs_real
def test_real_frappe():
    spec = f"libfm:{REAL / 'frappe' / 'frappe.validation.libfm.gz'},{REAL / 'frappe' / 'frappe.test.libfm.gz'}"
    t0 = time.process_time()
    t = read_table(spec, columns=FRAPPE_FIELDS)
    d = FeatureEncoder().fit_transform(t)
    cpu = time.process_time() - t0
    assert cpu < 2.0, f"Frappe read+encode took {cpu:.2f}s CPU"
    assert len(d) == 86_582 and d.num_fields == 10 and t.report.malformed == 0
    assert abs(d.positive_rate - 0.330) < 0.001
    # validation file first (57,722 rows), then test
    assert t.report.files[0].endswith("frappe.validation.libfm.gz")
    # field = position: each position's global indices lie in the documented range
    lo = [0, 957, 5039, 5046, 5053, 5055, 5058, 5060, 5069, 5149]
    hi = [956, 5038, 5045, 5052, 5054, 5057, 5059, 5068, 5148, 5381]
    for f in range(10):
        idx = t.columns[f].astype(np.int64)
        assert lo[f] <= idx.min() and idx.max() <= hi[f]
    assert d.field_sizes[2] <= 2 + 7 and d.field_sizes[1] <= 2 + 4082


@needs_real
def test_real_criteo():
    t = read_table(f"criteo:{REAL / 'criteo' / 'criteo_train.txt.gz'}")
    assert len(t) == 7_200 and len(t.field_names) == 39 and t.report.malformed == 0
    assert int(t.labels.sum()) == 1_549
    assert str(t.report) == "criteo_train.txt.gz: 7200 rows, 0 malformed"


@needs_real
def test_real_avazu():
    t = read_table(f"avazu:{REAL / 'avazu' / 'avazu_train.csv.gz'},{REAL / 'avazu' / 'avazu_dev.csv.gz'}")
    assert len(t) == 8_087 + 480 and len(t.field_names) == 22 and t.report.malformed == 0
    assert int(t.labels[:8_087].sum()) == 1_397 and int(t.labels[8_087:].sum()) == 86
    assert set(t.columns[0].tolist()) == {"00"}


@needs_real
def test_real_ipinyou():
    t = read_table(f"libfm:{REAL / 'ipinyou' / 'ipinyou_train.fm.txt.gz'}", columns=IPINYOU_FIELDS)
    assert len(t) == 26_773 and len(t.field_names) == 16 and t.report.malformed == 0
    assert int(t.labels.sum()) == 255


# ------------------------------------------------------------------------------------------------
# segmented synthetic data
# ------------------------------------------------------------------------------------------------
def test_make_segmented_shapes_rates_and_determinism():
    from fastkd.data.segmented import make_segmented

    d = make_segmented(20_000, seed=2, structures=("mf", "cross", "deep"), positive_rate=0.3)
    assert d.field_names[0] == "segment" and d.field_sizes[0] == 3 and d.num_fields == 9
    seg = d.ids[:, 0]
    for s in range(3):  # every segment's bias is fitted to the same click rate
        assert abs(d.labels[seg == s].mean() - 0.3) < 0.03
    again = make_segmented(20_000, seed=2, structures=("mf", "cross", "deep"), positive_rate=0.3)
    assert np.array_equal(d.ids, again.ids) and np.array_equal(d.labels, again.labels)
    # the hidden model depends on the seed, not on the row count
    head = make_segmented(500, seed=2, structures=("mf", "cross", "deep"), positive_rate=0.3)
    assert head.field_sizes == d.field_sizes
    other = make_segmented(20_000, seed=3, structures=("mf", "cross", "deep"))
    assert not np.array_equal(d.labels, other.labels)


def test_make_segmented_structure_carries_the_signal():
    """Swapping which structure drives each segment must change the labels' dependence on the
    fields: a per-segment structure is really used."""
    from fastkd.data.segmented import make_segmented

    a = make_segmented(30_000, seed=0, structures=("mf", "deep"), noise=0.0)
    b = make_segmented(30_000, seed=0, structures=("deep", "mf"), noise=0.0)
    assert np.array_equal(a.ids, b.ids)
    seg0 = a.ids[:, 0] == 0
    assert (a.labels[seg0] != b.labels[seg0]).mean() > 0.2


@pytest.mark.parametrize("kw,needle", [(dict(structures=("mf", "bogus")), "structures"),
                                       (dict(active_fields=2), "active_fields"),
                                       (dict(positive_rate=1.0), "positive_rate"),
                                       (dict(segment_probs=(0.5, 0.6)), "segment_probs"),
                                       (dict(strength=-1.0), "strength")])
def test_make_segmented_rejects_bad_arguments(kw, needle):
    from fastkd.data.segmented import make_segmented

    with pytest.raises(ValueError, match=needle):
        make_segmented(100, **kw)


def test_load_segmented_spec():
    from fastkd.data.segmented import make_segmented

    d = load("segmented:300")
    assert d.field_names[0] == "segment" and np.array_equal(d.ids, make_segmented(300).ids)
    with pytest.raises(ValueError, match="segmented:N"):
        load("segmented:lots")
