"""The data path never loses or misreports rows (issue #15): the libFM width comes from the data's
majority, malformed rows reach load()'s caller (attribute and warning), max_bad_rows stops a bad
read, CRLF and stray '\\r' are read as documented, and empty or wrong-kind data is a clear error.

Mutations that fail these tests (one line each):
- formats._libfm_width returns the first parsed width (``return len(parsed[1])`` in the loop):
  the short-first-line tests.
- loading.load drops ``data.read_report = second_pass.report`` or ``second_pass.warn()``:
  test_load_reports_malformed_rows.
- raw.check_report compares ``>=`` instead of ``>`` (or ignores fractions): test_max_bad_rows_*.
- raw._open_text opens with ``newline=""`` again: test_stray_cr_keeps_line_numbers.
- loading._Checked._pass skips ``check_report``: the empty/header-only tests.
- formats._libfm_width returns None when no line parses: test_wrong_kind_*.
"""
import gzip
import warnings
from pathlib import Path

import numpy as np
import pytest

from helpers import SHARED_DATA
from fastkd.data import (DEFAULT_MAX_BAD_ROWS, AVAZU_COLUMNS, MalformedRowsWarning, RawTable, iter_table, load,
                         read_table)


def write(path: Path, text: str, gz: bool = False) -> str:
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return str(path)


def libfm_lines(n: int, width: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [" ".join([str(rng.choice(["1", "-1"]))] + [f"{f * 100 + rng.integers(7)}:1" for f in range(width)])
            for _ in range(n)]


def load_quietly(spec, **kw):
    """load() with its warnings collected: (data, [MalformedRowsWarning messages])."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load(spec, **kw)
    return data, [str(w.message) for w in caught if issubclass(w.category, MalformedRowsWarning)]


# ---------------------------------------------------------------------------------------------
# libFM width: the majority, never the first line
# ---------------------------------------------------------------------------------------------
def test_libfm_short_first_line_loads_every_good_line(tmp_path):
    lines = libfm_lines(300)
    lines[0] = lines[0].rsplit(" ", 1)[0]          # first line one entry short
    path = write(tmp_path / "short.libfm", "\n".join(lines) + "\n")
    data, warned = load_quietly(f"libfm:{path}")
    assert len(data) == 299 and data.num_fields == 4
    r = data.read_report
    assert (r.rows_read, r.rows_ok, r.malformed) == (300, 299, 1)
    assert r.first_bad == [(path, 1, "expected 4 idx:val entries, got 3")]
    assert len(warned) == 1 and path in warned[0] and "short.libfm:1" in warned[0]
    # chunking and sharding agree with the whole read: the width is the source's, not a chunk's
    whole = read_table(f"libfm:{path}")
    assert len(whole) == 299 and whole.field_names == ["f0", "f1", "f2", "f3"]
    shards = [t for rank in range(3) for t in iter_table(f"libfm:{path}", chunk_rows=7, shard=(rank, 3))]
    shards.sort(key=lambda t: t.chunk)
    joined = RawTable.concat(shards)
    assert [c.tolist() for c in joined.columns] == [c.tolist() for c in whole.columns]
    assert joined.report.first_bad == whole.report.first_bad


def test_libfm_width_tie_goes_to_the_width_seen_first(tmp_path):
    path = write(tmp_path / "tie.libfm", "1 1:1 2:1 3:1\n0 1:1 2:1\n1 4:1 5:1 6:1\n0 3:1 4:1\n")
    t = read_table(f"libfm:{path}")
    assert t.field_names == ["f0", "f1", "f2"] and len(t) == 2


@pytest.mark.skipif(not (SHARED_DATA / "frappe").is_dir(), reason="../shared/data not present")
def test_real_frappe_with_a_short_first_line(tmp_path):
    with gzip.open(SHARED_DATA / "frappe" / "frappe.test.libfm.gz", "rt") as fh:
        lines = fh.read().splitlines()
    lines[0] = lines[0].rsplit(" ", 1)[0]
    path = write(tmp_path / "frappe.test.libfm.gz", "\n".join(lines) + "\n", gz=True)
    data, warned = load_quietly(f"libfm:{path}")
    assert len(data) == 28_859 and data.num_fields == 10        # was 1 row of 28,860
    assert data.read_report.malformed == 1 and data.read_report.first_bad[0][1] == 1
    assert len(warned) == 1 and "1 malformed row of 28860" in warned[0]


# ---------------------------------------------------------------------------------------------
# malformed rows reach load()'s caller; max_bad_rows
# ---------------------------------------------------------------------------------------------
def _with_bad_lines(tmp_path, n=600, bad=(10, 200, 201, 599), name="d.libfm"):
    lines = libfm_lines(n)
    for i in bad:                                    # 1-based line numbers
        lines[i - 1] = "1 5:1"
    return write(tmp_path / name, "\n".join(lines) + "\n")


def test_load_reports_malformed_rows(tmp_path):
    path = _with_bad_lines(tmp_path)
    with pytest.warns(MalformedRowsWarning) as caught:
        data = load(f"libfm:{path}")
    assert len(data) == 596
    r = data.read_report
    assert (r.rows_read, r.rows_ok, r.malformed) == (600, 596, 4)
    assert [b[1] for b in r.first_bad] == [10, 200, 201, 599]
    msg = str(caught[0].message)
    assert path in msg and "4 malformed rows of 600" in msg and "d.libfm:10:" in msg
    assert caught[0].filename == __file__                        # points at load()'s caller
    assert r.to_dict()["first_bad"][0] == {"file": path, "line": 10, "reason": "expected 4 idx:val entries, got 1"}
    # with a fitted encoder (valid/test sets) and the hash encoder the report comes along too
    _, enc = load_quietly(f"libfm:{path}", return_encoder=True, max_bad_rows=10)[0]
    again, _ = load_quietly(f"libfm:{path}", encoder=enc)
    hashed, warned = load_quietly(f"libfm:{path}", kind="hash", num_buckets=64)
    assert again.read_report.malformed == hashed.read_report.malformed == 4 and len(warned) == 1
    # a clean read: a report, no warning
    clean = write(tmp_path / "clean.libfm", "\n".join(libfm_lines(50)) + "\n")
    data, warned = load_quietly(f"libfm:{clean}")
    assert data.read_report.malformed == 0 and data.read_report.rows_ok == 50 and not warned
    # parts of the data do not claim the whole read's report
    assert data.subset(slice(0, 10)).read_report is None


def test_max_bad_rows_count_and_fraction(tmp_path):
    path = _with_bad_lines(tmp_path)                  # 4 bad of 600
    with pytest.raises(ValueError) as e:
        load(f"libfm:{path}", max_bad_rows=3)
    assert path in str(e.value) and "4 malformed rows of 600" in str(e.value) and "max_bad_rows=3" in str(e.value)
    assert len(load_quietly(f"libfm:{path}", max_bad_rows=4)[0]) == 596        # at the limit: let through
    with pytest.raises(ValueError, match=r"max_bad_rows=0\.005 .*: 3 rows"):
        load(f"libfm:{path}", max_bad_rows=0.005)                             # 0.5 % of 600 = 3
    assert len(load_quietly(f"libfm:{path}", max_bad_rows=4 / 600)[0]) == 596
    with pytest.raises(ValueError, match="max_bad_rows=0 rows"):
        load(f"libfm:{path}", max_bad_rows=0)
    with pytest.raises(ValueError, match=r"d\.libfm:10: expected 4"):          # strict: the first line
        load(f"libfm:{path}", strict=True)


def test_max_bad_rows_default_is_one_percent(tmp_path):
    assert DEFAULT_MAX_BAD_ROWS == 0.01
    ok = _with_bad_lines(tmp_path, bad=range(1, 7), name="six.libfm")        # 6 of 600 = 1 %
    assert len(load_quietly(f"libfm:{ok}")[0]) == 594
    over = _with_bad_lines(tmp_path, bad=range(1, 8), name="seven.libfm")    # 7 of 600
    with pytest.raises(ValueError, match=r"seven\.libfm: 7 malformed rows of 600 .*max_bad_rows=0\.01"):
        load(f"libfm:{over}")


@pytest.mark.parametrize("value", [-1, 1.5, float("nan"), True, "5", None])
def test_max_bad_rows_bad_values(tmp_path, value):
    path = write(tmp_path / "d.libfm", "\n".join(libfm_lines(5)) + "\n")
    with pytest.raises(ValueError, match="max_bad_rows"):
        load(f"libfm:{path}", max_bad_rows=value)


# ---------------------------------------------------------------------------------------------
# line ends: CRLF reads like LF; a stray '\r' is data and shifts no line number
# ---------------------------------------------------------------------------------------------
def _tables_equal(a: RawTable, b: RawTable):
    assert a.field_names == b.field_names
    np.testing.assert_array_equal(a.labels, b.labels)
    assert [c.tolist() for c in a.columns] == [c.tolist() for c in b.columns]
    assert [x[1:] for x in a.report.first_bad] == [x[1:] for x in b.report.first_bad]
    assert (a.report.rows_read, a.report.rows_ok) == (b.report.rows_read, b.report.rows_ok)


@pytest.mark.parametrize("gz", [False, True])
def test_crlf_files_read_like_lf(tmp_path, gz):
    libfm = libfm_lines(20)
    libfm[6] = "1 5:1"                                # a malformed line keeps its number
    csv_lines = ["label,a,n"] + [f"{i % 2},v{i % 3},{i}" for i in range(20)] + ["1,x"]
    criteo = ["\t".join([str(i % 2)] + [str(i)] * 13 + [f"c{i}"] * 25 + ([f"last{i}"] if i != 3 else []))
              for i in range(20)]
    for kind, lines, kw in (("libfm", libfm, {}), ("csv", csv_lines, {"numeric": ["n"]}), ("criteo", criteo, {})):
        lf_path = write(tmp_path / f"{kind}.lf", "\n".join(lines) + "\n", gz)
        crlf_path = write(tmp_path / f"{kind}.crlf", "\r\n".join(lines) + "\r\n", gz)
        lf = read_table(f"{kind}:{lf_path}", **kw)
        crlf = read_table(f"{kind}:{crlf_path}", **kw)
        _tables_equal(crlf, lf)
        data, _ = load_quietly(f"{kind}:{crlf_path}", max_bad_rows=1, **kw)
        assert len(data) == len(lf) and data.read_report.first_bad[0][1:] == lf.report.first_bad[0][1:]
        assert lf.report.malformed == 1
        assert not any("\r" in str(v) for c in crlf.columns for v in c.tolist())


@pytest.mark.parametrize("gz", [False, True])
def test_stray_cr_keeps_line_numbers(tmp_path, gz):
    # libfm: a '\r' between entries separates them like a space; line 4's error keeps its number
    lines = libfm_lines(5, width=2)
    lines[1] = lines[1].replace(" ", "\r", 2).replace("\r", " ", 1)
    lines[3] = "1 5:1"
    t = read_table("libfm:" + write(tmp_path / "d.libfm", "\n".join(lines) + "\n", gz))
    assert len(t) == 4 and [b[1] for b in t.report.first_bad] == [4]
    # csv: kept in a quoted field; an unquoted one makes its own row malformed, and only it
    text = 'label,a\n1,"x\ry"\n0,p\rq\n1\n0,z\n'
    path = write(tmp_path / "d.csv", text, gz)
    t = read_table(f"csv:{path}")
    assert t.columns[0].tolist() == ["x\ry", "z"]
    assert [b[1] for b in t.report.first_bad] == [3, 4] and "'\\r' inside an unquoted field" in t.report.first_bad[0][2]
    # criteo: the token keeps it; later line numbers are right
    row = "\t".join(["1"] + ["1"] * 13 + ["c\rd"] + ["e"] * 25)
    t = read_table("criteo:" + write(tmp_path / "c.txt", row + "\n0\n" + row + "\n", gz))
    assert len(t) == 2 and t.columns[13].tolist() == ["c\rd"] * 2 and t.report.first_bad[0][1] == 2


def test_old_mac_line_ends_are_refused(tmp_path):
    path = write(tmp_path / "mac.libfm", "\r".join(libfm_lines(5)) + "\r")
    with pytest.raises(ValueError, match=r"mac\.libfm: lines end in a lone"):
        load(f"libfm:{path}")


# ---------------------------------------------------------------------------------------------
# empty, header-only, wrong kind
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,text,expected", [
    ("criteo", "", "40 tab-separated"),
    ("libfm", "\n\n", "idx:val"),
    ("csv", "", "header row"),
    ("csv", "label,a,b\r\n", "header row"),
    ("avazu", "", "24 comma-separated"),
    ("avazu", ",".join(AVAZU_COLUMNS) + "\n", "24 comma-separated"),
])
def test_empty_or_header_only_data_is_a_clear_error(tmp_path, kind, text, expected):
    path = write(tmp_path / f"empty.{kind}", text, gz=kind == "criteo")
    with pytest.raises(ValueError) as e:
        load(f"{kind}:{path}")
    msg = str(e.value)
    assert path in msg and "no data rows" in msg and expected in msg
    with pytest.raises(ValueError, match="no data rows"):
        read_table(f"{kind}:{path}")


@pytest.mark.skipif(not (SHARED_DATA / "criteo").is_dir(), reason="../shared/data not present")
def test_wrong_kind_real_files(tmp_path):
    criteo = str(SHARED_DATA / "criteo" / "criteo_dev.txt.gz")
    with pytest.raises(ValueError) as e:
        load(f"libfm:{criteo}")
    assert criteo in str(e.value) and "libfm row" in str(e.value) and "kind" in str(e.value)
    frappe = str(SHARED_DATA / "frappe" / "frappe.test.libfm.gz")
    with pytest.raises(ValueError) as e:
        load(f"criteo:{frappe}")
    assert frappe in str(e.value) and "none of the 28860 rows read as 'criteo'" in str(e.value)


def test_wrong_kind_small_files(tmp_path):
    row = "\t".join(["1"] + ["2"] * 13 + ["ab"] * 26)
    tsv = write(tmp_path / "c.tsv", (row + "\n") * 5)
    with pytest.raises(ValueError, match=r"c\.tsv: none of the first 5 non-empty lines is a libfm row"):
        load(f"libfm:{tsv}")
    with pytest.raises(ValueError, match=r"c\.tsv: none of the 5 rows read as 'avazu'"):
        load(f"avazu:{tsv}")
    libfm = write(tmp_path / "d.libfm", "\n".join(libfm_lines(5)) + "\n")
    with pytest.raises(ValueError, match=r"d\.libfm: none of the 5 rows read as 'criteo'.*line 1: expected 40"):
        load(f"criteo:{libfm}")


# ---------------------------------------------------------------------------------------------
# gzip damaged past the start the readers sniff
# ---------------------------------------------------------------------------------------------
def _damaged_gzips(tmp_path: Path, kind: str):
    """(truncated, flipped) gzip files whose first 64 KiB inflate fine: the damage is further in."""
    rng = np.random.default_rng(0)
    if kind == "criteo":
        lines = ["\t".join([str(rng.integers(2))] + [str(v) for v in rng.integers(0, 50, 13)] +
                           [f"{v:08x}" for v in rng.integers(0, 5000, 26)]) for _ in range(6000)]
    else:
        lines = ["label,a,b"] + [f"{rng.integers(2)},{rng.integers(5000)},{rng.random()}" for _ in range(60000)]
    gz = gzip.compress(("\n".join(lines) + "\n").encode())
    trunc, flip = tmp_path / f"trunc.{kind}.gz", tmp_path / f"flip.{kind}.gz"
    trunc.write_bytes(gz[: len(gz) * 2 // 3])
    bad = bytearray(gz)
    bad[len(gz) * 2 // 3] ^= 0xFF
    flip.write_bytes(bytes(bad))
    return str(trunc), str(flip)


@pytest.mark.parametrize("kind", ["csv", "criteo"])
def test_gzip_damaged_mid_stream_names_the_file(tmp_path, kind):
    # mutation caught: the readers' gzip streams opened with plain gzip.open (EOFError / BadGzipFile
    # from deep inside, no file named)
    trunc, flip = _damaged_gzips(tmp_path, kind)
    kw = {"label": "label"} if kind == "csv" else {}
    with pytest.raises(ValueError, match=r"trunc\.\w+\.gz: gzip data is truncated"):
        load(f"{kind}:{trunc}", **kw)
    with pytest.raises(ValueError, match=r"flip\.\w+\.gz: gzip data is corrupt"):
        load(f"{kind}:{flip}", **kw)
    if kind == "criteo":  # the native encoder of the on-disk cache reads the same way
        from fastkd.data.encoded_cache import cached_split

        with pytest.raises(ValueError, match=r"trunc\.criteo\.gz: gzip data is truncated"):
            cached_split(f"criteo:{trunc}", tmp_path / "cache", kind="hash", num_buckets=1000)


def test_damaged_parquet_names_the_file(tmp_path):
    # mutation caught: pyarrow's ArrowInvalid / OSError reaching the caller with no file named
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    n = 20000
    rng = np.random.default_rng(0)
    table = pa.table({"label": rng.integers(0, 2, n), "a": [f"v{i % 500}" for i in range(n)],
                      "b": [f"w{i % 77}" for i in range(n)]})
    ok = tmp_path / "ok.parquet"
    pq.write_table(table, ok, row_group_size=5000, compression="snappy")
    data = ok.read_bytes()
    half, flip, text = tmp_path / "half.parquet", tmp_path / "flip.parquet", tmp_path / "rows.parquet"
    half.write_bytes(data[: len(data) // 2])
    bad = bytearray(data)
    for k in range(200, 2200):  # inside the first row group's pages
        bad[k] ^= 0x5A
    flip.write_bytes(bytes(bad))
    text.write_text("label,a\n1,x\n")
    for path, needle in ((half, "not a readable Parquet file"), (text, "not a readable Parquet file"),
                         (flip, "corrupt Parquet data")):
        with pytest.raises(ValueError, match=f"{path.name}: {needle}"):
            load(f"parquet:{path}", label="label")
    assert len(load(f"parquet:{ok}", label="label")) == n
