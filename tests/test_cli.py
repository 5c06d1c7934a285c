"""The command line: demo and distill end to end on small data, report files, bad arguments."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, SHARED_DATA
from fastkd.cli import main
from fastkd.data import MalformedRowsWarning

FAST = ["--max-epochs", "2", "--embed-dim", "4", "--hidden-units", "16", "--teachers", "deepfm,dcn",
        "--batch-size", "512"]


def _check_outputs(out, n_seeds, distills):
    records = json.loads((out / "results.json").read_text())
    for r in records:
        assert {"model", "role", "distill", "seed", "auc", "logloss"} <= set(r)
        assert r["role"] in ("teacher", "ensemble", "student")
        assert r["distill"] in ("none", "single", "mean", "gate")
        assert 0.0 <= r["auc"] <= 1.0 and r["logloss"] > 0
    got = {(r["role"], r["distill"]) for r in records}
    assert {("teacher", "none"), ("ensemble", "mean"), ("student", "none")} <= got
    assert {("student", d) for d in distills} <= got
    assert sorted({r["seed"] for r in records}) == list(range(n_seeds))
    report = (out / "report.md").read_text()
    assert "Command: `fastkd" in report and "| model |" in report and "torch" in report
    assert (out / "auc.png").stat().st_size > 1000
    return records


def test_demo_small(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--rows", "4000", "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "| dnn (gate) |" in printed and "report:" in printed
    _check_outputs(out, 1, ["mean", "gate"])
    assert (out / "gate_weights.png").exists()


def _write_libfm(path, n=3000, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [30, 50, 7, 4]
    offsets = np.cumsum([0] + sizes[:-1])
    ids = np.stack([rng.integers(0, s, n) for s in sizes], 1)
    logit = np.sin(ids[:, 0]) + np.cos(ids[:, 1] * 0.7) * (ids[:, 2] - 3) / 3 + 0.3 * ids[:, 3]
    y = rng.random(n) < 1 / (1 + np.exp(-2 * logit))
    lines = [" ".join([("1" if yi else "-1")] + [f"{o + v}:1" for o, v in zip(offsets, row)])
             for yi, row in zip(y, ids)]
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")


def test_distill_libfm_with_ablations_two_seeds(tmp_path):
    data = tmp_path / "toy.libfm.gz"
    _write_libfm(data)
    out = tmp_path / "run"
    code = main(["distill", "--data", f"libfm:{data}", "--seeds", "2", "--out", str(out), *FAST,
                 "--ablations", "all"])
    assert code == 0
    records = _check_outputs(out, 2, ["single", "mean", "gate"])
    variants = {r.get("variant") for r in records}
    assert sum(r["distill"] == "single" for r in records) == 2  # 'all' includes the single-teacher row
    for v in ("hint instead of soft label", "co-train", "stop on kd loss", "stop on kd loss, merged valid",
              "not merged, auc on whole valid split"):
        assert v in variants
    # merged validation is the default: the ablation row is the plain DNN on the whole valid split
    other_plain = [r for r in records if r["distill"] == "none" and r.get("variant")]
    assert len(other_plain) == 2 and other_plain[0]["variant"] == "not merged, auc on whole valid split"
    assert "Merged validation: students and the plain DNN" in (out / "report.md").read_text()
    assert any(v.startswith("D: ") for v in variants)
    report = (out / "report.md").read_text()
    assert " ± " in report  # two seeds: mean ± std


def test_distill_reports_malformed_rows(tmp_path, capsys):
    data = tmp_path / "toy.libfm.gz"
    _write_libfm(data, n=1500)
    with gzip.open(data, "rt") as fh:
        lines = fh.read().splitlines()
    lines[0] = lines[0].rsplit(" ", 1)[0]      # a short first line fixes no width
    lines[700] = "1 3:1 x"
    with gzip.open(data, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    out = tmp_path / "run"
    with pytest.warns(MalformedRowsWarning, match="2 malformed rows of 1500"):
        code = main(["distill", "--data", f"libfm:{data}", "--out", str(out), *FAST, "--max-epochs", "1",
                     "--augment", "0", "--gate", "mean"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "rows read: data `toy.libfm.gz`: 1,500 rows read, 1,498 kept, 2 malformed skipped" in printed
    assert "toy.libfm.gz:1: expected 4 idx:val entries, got 3" in printed
    report = (out / "report.md").read_text()
    assert "Rows read: data `toy.libfm.gz`" in report and "toy.libfm.gz:701: entry 2 'x' is not idx:val" in report
    records = json.loads((out / "results.json").read_text())
    for r in records:
        rep = r["read_report"]["data"]
        assert (rep["rows_read"], rep["rows_ok"], rep["malformed"]) == (1500, 1498, 2)
        assert [b["line"] for b in rep["first_bad"]] == [1, 701]


def test_distill_stops_above_max_bad_rows_before_training(tmp_path, capsys):
    train = tmp_path / "train.libfm.gz"
    _write_libfm(train, n=1000)
    with gzip.open(train, "rt") as fh:
        lines = fh.read().splitlines()
    for i in (3, 4, 5):
        lines[i] = "1 1:1"
    with gzip.open(train, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    out = tmp_path / "run"
    code = main(["distill", "--train", f"libfm:{train}", "--valid", f"libfm:{train}", "--test", f"libfm:{train}",
                 "--out", str(out), *FAST, "--max-bad-rows", "2"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(train) in err and "3 malformed rows of 1000" in err and "max_bad_rows=2 rows" in err
    assert not out.exists()                      # stopped before anything trained or was written
    assert main(["distill", "--data", f"libfm:{train}", "--out", str(out), "--strict"]) == 2
    assert "train.libfm.gz:4: expected 4" in capsys.readouterr().err


@pytest.mark.parametrize("text,value", [("5", 5), ("0", 0), ("0.01", 0.01), ("1%", 0.01), ("1.0", 1.0)])
def test_max_bad_rows_argument(text, value):
    from fastkd.cli import build_parser

    args = build_parser().parse_args(["distill", "--data", "libfm:x", "--out", "o", "--max-bad-rows", text])
    assert args.max_bad_rows == pytest.approx(value) and type(args.max_bad_rows) is type(value)
    assert build_parser().parse_args(["distill", "--data", "libfm:x", "--out", "o"]).max_bad_rows is None


@pytest.mark.parametrize("text", ["-1", "1.5", "nan", "x", "200%"])
def test_max_bad_rows_argument_refused(text, capsys):
    from fastkd.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "--data", "libfm:x", "--out", "o", "--max-bad-rows", text])
    assert "--max-bad-rows" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["distill", "--data", "libfm:/nonexistent.gz", "--out", "x"], "nonexistent"),
    (["distill", "--data", "nosuchkind:/tmp/x", "--out", "x"], "nosuchkind"),
    (["distill", "--out", "x"], "--data"),
    (["distill", "--data", "libfm:a", "--train", "libfm:b", "--out", "x"], "not both"),
    (["demo", "--teachers", "deepfm,resnet"], "resnet"),
    (["demo", "--seeds", "0"], "positive"),
    (["demo", "--ablations", "magic"], "magic"),
    (["distill", "--data", "libfm:/tmp/x", "--encoder", "hash", "--out", "x"], "--num-buckets"),
    (["distill", "--data", "libfm:/tmp/x", "--num-buckets", "100", "--out", "x"], "--encoder hash"),
    (["distill", "--data", "libfm:/tmp/x", "--encoder", "hash", "--num-buckets", "1", "--out", "x"], "2"),
    (["demo", "--ablations", "teacher_folds=x+nosuchkey=1"], "nosuchkey"),
    (["demo", "--ablations", "early_stop=median"], "early_stop"),
    (["demo", "--ablations", "teacher_folds=x"], "teacher_folds"),
    (["demo", "--augment", "-1"], "augment"),
    (["demo", "--temperature", "-1", "--rows", "500", "--max-epochs", "1"], "temperature"),
])
def test_bad_arguments_give_one_line_error(argv, needle):
    proc = subprocess.run([sys.executable, "-m", "fastkd", *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    err = [ln for ln in proc.stderr.strip().splitlines() if "error" in ln]
    assert err and needle in err[-1]


def test_distill_hash_encoder(tmp_path):
    # --encoder hash from the CLI: every field hashed into --num-buckets ids (one count, or one per field)
    data = tmp_path / "toy.libfm.gz"
    _write_libfm(data, n=1500)
    for buckets, sizes in (("64", [64] * 4), ("40,60,8,5", [40, 60, 8, 5])):
        out = tmp_path / f"run{len(sizes)}{buckets[:2]}"
        assert main(["distill", "--data", f"libfm:{data}", "--encoder", "hash", "--num-buckets", buckets,
                     "--out", str(out), *FAST, "--max-epochs", "1", "--teachers", "dnn", "--threads", "1"]) == 0
        assert "hash encoding" in (out / "report.md").read_text()
        assert json.loads((out / "results.json").read_text())  # a complete run
    assert main(["distill", "--data", f"libfm:{data}", "--encoder", "hash", "--num-buckets", "8,8",
                 "--out", str(tmp_path / "bad"), *FAST]) == 2  # two counts for four fields


@pytest.mark.skipif(not (SHARED_DATA / "criteo").exists(), reason="../shared/data not present")
def test_distill_real_criteo_smoke(tmp_path):
    d = SHARED_DATA / "criteo"
    out = tmp_path / "criteo"
    code = main(["distill", "--train", f"criteo:{d / 'criteo_train.txt.gz'}", "--valid", f"criteo:{d / 'criteo_dev.txt.gz'}",
                 "--test", f"criteo:{d / 'criteo_test.txt.gz'}", "--out", str(out), *FAST, "--max-epochs", "1"])
    assert code == 0
    _check_outputs(out, 1, ["mean", "gate"])


def test_merge_validation_is_the_default_and_can_be_switched_off():
    from fastkd.cli import _spec, build_parser

    base = ["distill", "--data", "libfm:x", "--out", "o"]
    on = _spec(build_parser().parse_args(base)).config
    off = _spec(build_parser().parse_args(base + ["--no-merge-validation", "--monitor-fraction", "0.3"])).config
    assert on.merge_validation and on.monitor_fraction == 0.5 and on.monitor_window == 3
    assert not off.merge_validation and off.monitor_fraction == 0.3
    assert not on.for_teachers().merge_validation  # teachers never train on validation rows


def test_distill_defaults_are_the_documented_ones():
    """README's defaults table and docs/accuracy.md describe these; a changed default must change them."""
    from fastkd.cli import _spec, auto_batch_size, build_parser

    spec = _spec(build_parser().parse_args(["distill", "--data", "libfm:x", "--out", "o"]))
    assert (spec.gate, spec.gate_fit, spec.augment, spec.teacher_folds) == ("features", None, 1.0, 1)
    assert spec.config.batch_size == 2048
    # at least 32 steps an epoch, never above the cap, never below 32
    assert auto_batch_size(69_265) == 2048 and auto_batch_size(5_000) == 128
    assert auto_batch_size(10) == 32 and auto_batch_size(10**8, cap=512) == 512
    for n in (100, 5_000, 40_000, 65_535, 65_536):
        bs = auto_batch_size(n)
        assert bs == 32 or n >= 32 * bs


def test_cli_model_names_are_the_registry():
    from fastkd.cli import MODEL_NAMES
    from fastkd.models import MODELS

    assert sorted(MODEL_NAMES) == sorted(MODELS)


def test_dev_split_sets_the_test_split_aside():
    from fastkd.cli import _dev_split
    from fastkd.data import CTRData

    n = 1000
    data = CTRData(np.arange(n)[:, None], np.arange(n) % 2, ["row"], [n])
    train, valid, test = data.split((0.8, 0.1, 0.1), seed=0)
    (a, b, c), desc = _dev_split(train, valid, test, 0)
    rows = [set(x.ids[:, 0].tolist()) for x in (a, b, c)]
    assert not set(test.ids[:, 0].tolist()) & set().union(*rows)          # the test rows are not used
    assert set().union(*rows) == set(train.ids[:, 0].tolist()) | set(valid.ids[:, 0].tolist())
    assert (len(a), len(b), len(c)) == (720, 90, 90) and "set aside" in desc


def test_new_options_reach_the_spec():
    from fastkd.cli import _spec, build_parser

    args = build_parser().parse_args(["distill", "--data", "libfm:x", "--out", "o", "--gate", "features",
                                      "--teacher-folds", "3", "--augment", "1.5", "--augment-swap", "0.1",
                                      "--ablations", "teacher_folds=1+gate=mean,single"])
    spec = _spec(args)
    assert (spec.gate, spec.teacher_folds, spec.augment, spec.augment_swap) == ("features", 3, 1.5, 0.1)
    assert spec.ablations == ["teacher_folds=1+gate=mean", "single"]


def test_unwritable_out_fails_before_reading_data(tmp_path, capsys):
    """An --out that cannot be written stops the run before the data is read (so before any training)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [(afile / "run", "cannot be created: " + str(afile) + " is a file"), (afile, "is a file, not a folder")]
    if sys.platform.startswith("linux"):
        cases.append((Path("/proc/fastkd-out"), "is not writable"))  # nobody, root included, creates files there
    for out, needle in cases:
        assert main(["distill", "--data", "libfm:/nonexistent.gz", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}" in err and needle in err and "nonexistent" not in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_fails_before_reading_data(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["demo", "--rows", "500", "--out", str(ro / "run")]) == 2
        assert f"--out {ro / 'run'} is not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


def test_dist_timeout_argument():
    from fastkd.cli import DIST_TIMEOUT_S, build_parser

    assert build_parser().parse_args(["demo"]).dist_timeout == DIST_TIMEOUT_S == 1800  # torch's default
    assert build_parser().parse_args(["demo", "--dist-timeout", "2.5"]).dist_timeout == 2.5
    for bad in ("0", "-1", "nan", "inf", "x"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["demo", "--dist-timeout", bad])


def test_dist_timeout_reaches_init_process_group(monkeypatch):
    import datetime

    from fastkd import distributed

    seen = {}
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(distributed, "is_initialized", lambda: False)
    assert distributed.init_process_group("gloo", rank=0, world_size=2, timeout_s=7.5)
    assert seen["timeout"] == datetime.timedelta(seconds=7.5)
    with pytest.raises(ValueError, match="timeout_s"):
        distributed.init_process_group("gloo", rank=0, world_size=2, timeout_s=0)


def test_dist_timeout_bounds_the_wait_for_a_peer_that_never_comes(tmp_path):
    """Rank 1 of 2 with no rank 0: fails after --dist-timeout with one error line, not torch's 30 minutes."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fastkd", "demo", "--rows", "500", "--out", str(tmp_path / "o"),
                           "--dist-timeout", "1"], env=env, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "fastkd: error: could not join the process group (rank 1 of 2, --dist-timeout 1 s)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 120


def _foreign_out(out: Path) -> None:
    (out / "student").mkdir(parents=True)
    (out / "report.md").write_text("my notes\n")
    (out / "results.json").write_text("{}")
    (out / "student" / "thesis.txt").write_text("x")


def test_fresh_run_refuses_an_out_holding_files_no_run_wrote(tmp_path, capsys):
    # mutation caught: a fresh run clearing result-named files of a folder no run wrote
    out = tmp_path / "mine"
    _foreign_out(out)
    assert main(["distill", "--data", "libfm:/nonexistent.gz", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "which no fastkd run wrote" in err and "report.md, results.json, student/" in err
    assert "nonexistent" not in err  # refused before the data is read
    assert (out / "report.md").read_text() == "my notes\n" and (out / "student" / "thesis.txt").exists()


def test_clearing_a_run_folder_keeps_what_fastkd_did_not_write(tmp_path):
    from fastkd.cli import _clear_out, _is_run_folder

    out = tmp_path / "run"
    _foreign_out(out)
    assert not _is_run_folder(out)
    (out / "report.md").write_text("# fastkd distillation report\n")
    (out / "student" / "student.pt").write_bytes(b"x")
    (out / "student" / "encoder.json").write_text("{}")
    assert _is_run_folder(out)
    said = []
    _clear_out(out, resume=False, log=said.append)
    assert not (out / "report.md").exists() and not (out / "results.json").exists()
    assert sorted(p.name for p in (out / "student").iterdir()) == ["thesis.txt"]
    assert "removing an earlier run's report.md, results.json, student/" in said[0]
    assert "keeping thesis.txt" in said[1]


@pytest.mark.parametrize("flags,needle", [
    (["--temperature", "0"], "temperature must be finite and > 0"),
    (["--lr", "nan"], "lr must be a finite number > 0"),
    (["--dropout", "1.5"], "dropout must be in [0, 1)"),
    (["--hidden-units", "0"], "hidden_units[0] must be a positive int"),
    (["--ablations", "kd_weight=-1"], "--ablations"),
    (["--ablations", "ensemble=foo"], "ensemble must be 'logit' or 'prob'"),
    (["--segment-field", "nosuch"], "--segment-field 'nosuch' is not a field"),
])
def test_bad_settings_fail_before_an_earlier_run_is_removed(tmp_path, capsys, flags, needle):
    # mutation caught: a setting checked only when a model or the Distiller is built (after the
    # earlier run's results were removed, or after hours of training)
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.md").write_text("# fastkd distillation report\nearlier\n")
    assert main(["distill", "--data", "synthetic:600", "--teachers", "dnn", "--seeds", "1", "--out", str(out),
                 *flags]) == 2
    assert needle in capsys.readouterr().err
    assert (out / "report.md").read_text().endswith("earlier\n")


def test_negative_seeds_are_refused_naming_the_flag(capsys):
    # mutation caught: type=int (numpy's "expected non-negative integer" later, no flag named)
    for argv in (["distill", "--data", "synthetic:100", "--split-seed", "-1", "--out", "o"],
                 ["demo", "--data-seed", "-1"]):
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err
        assert "seed, an integer >= 0" in err and ("--split-seed" in err or "--data-seed" in err)


def test_one_student_and_each_ablation_key_once(capsys):
    # mutation caught: the first of several students kept silently; the last of a repeated key winning
    with pytest.raises(SystemExit):
        main(["distill", "--data", "synthetic:100", "--student", "dnn,deepfm", "--out", "o"])
    assert "expected one model, got 2" in capsys.readouterr().err
    assert main(["distill", "--data", "synthetic:100", "--ablations", "augment=0+augment=1", "--out", "o"]) == 2
    assert "sets augment twice" in capsys.readouterr().err


def test_a_split_with_one_class_is_named_before_training(tmp_path, capsys):
    # mutation caught: "AUC is undefined when only one class is present" after the teachers trained
    path = tmp_path / "one.csv"
    rows = ["label,a,b"] + [f"{int(i == 0)},{i % 7},{i % 5}" for i in range(200)]  # one click in 200 rows
    path.write_text("\n".join(rows) + "\n")
    code = main(["distill", "--data", f"csv:{path}", "--label", "label", "--teachers", "dnn",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    # at most one split holds the click: the first split checked without it is named
    assert code == 2 and "split (" in err and "holds only label 0" in err and "AUC needs both classes" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


@pytest.mark.parametrize("flags,needle", [
    (["--data", "synthetic:300", "--label", "x"], "--label names a column of csv, parquet or avazu data"),
    (["--data", "synthetic:300", "--cache-dir", "c"], "generated data (synthetic/segmented) is made in memory"),
    (["--train", "synthetic:300", "--valid", "synthetic:100", "--test", "synthetic:100", "--cache-dir", "c"],
     "--cache-dir works with --data"),
    (["--data", "csv:a.csv,b.csv,a.csv"], "--data names a.csv more than once"),
])
def test_flags_that_would_be_ignored_are_refused(tmp_path, capsys, flags, needle):
    # mutation caught: --label / --cache-dir accepted and ignored, a file read twice into train and test
    assert main(["distill", *flags, "--teachers", "dnn", "--out", str(tmp_path / "run")]) == 2
    assert needle in capsys.readouterr().err


def test_a_split_file_with_other_columns_is_named_by_its_flag(tmp_path, capsys):
    # mutation caught: "table fields ... differ" with no file or split named
    (tmp_path / "t.csv").write_text("label,a,b\n1,x,y\n0,z,w\n1,x,w\n0,z,y\n")
    (tmp_path / "v.csv").write_text("label,a,c\n1,x,y\n0,z,w\n")
    t, v = f"csv:{tmp_path / 't.csv'}", f"csv:{tmp_path / 'v.csv'}"
    assert main(["distill", "--train", t, "--valid", v, "--test", t, "--teachers", "dnn",
                 "--out", str(tmp_path / "run")]) == 2
    assert f"--valid {v}: table fields ['a', 'c'] differ" in capsys.readouterr().err
