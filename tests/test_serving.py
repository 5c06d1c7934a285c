"""Serving the student: the exportable forward, TorchScript and ONNX exports equal to PyTorch, the
raw-row encoder equal to the data loader's, `fastkd distill` saving its student and reporting the
serving cost, and `fastkd export` end to end. ONNX tests skip where fastkd[serving] is absent.

Mutations that fail these tests (one per test, in order):
- ServingModel.forward without the field offsets (``flat_ids = ids``);
- ServingModel.__init__ without ``self.eval()`` and export_student without ``model.eval()`` (a model left
  in training mode traced with its dropout);
- export_onnx without ``dynamic_shapes`` (the graph fixed at the example's batch size);
- field_rules testing ``kind == "avazu" and n == "hour"`` before the numeric columns;
- RawRowEncoder._column without the Avazu hour rule (``if rule == "avazu_hour"`` -> ``if False``);
- field_rules without Criteo's numeric fields (``num = set(numeric)``);
- export_student checking for the ONNX packages only when it reaches the ONNX file (``require_onnx`` up front removed);
- time_calls stopping at the time budget alone (``len(times) < min_calls or`` removed);
- serving_benchmark without its ``try`` around the ONNX part (the exception escapes);
- the CLI not passing ``student_dir`` to run_experiment (no student saved);
- report.write_report without the serving section;
- cli._clear_out removing ``student/`` on ``--resume`` too;
- export_student ignoring the saved encoder (``encoder = encoder``);
- the CLI passing ``serving=True`` whatever ``--no-serving`` says;
- ``--format`` parsed as a plain string (no check of the names);
- EXPORT_FORMATS and FORMATS out of step.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from fastkd.cli import main
from fastkd.data import load
from fastkd.models import MODELS, build_model
from fastkd.serving import (FORMATS, TOLERANCE, EnsembleModel, RawRowEncoder, ServingModel, export_student,
                            field_rules, load_student)
from fastkd.serving import _onnx

# torch 2.13 deprecates torch.jit; the TorchScript file is still what a C++ libtorch server loads
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
HAS_ONNX = not _onnx.onnx_missing()
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="fastkd[serving] (onnx, onnxruntime, onnxscript) not installed")
SIZES = [13, 7, 30, 4, 2]


def _ids(n, sizes=SIZES, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, s, (n,), generator=g) for s in sizes], 1)


def _trained_student(sizes=SIZES, name="dnn"):
    """A small student a few Adam steps away from its start, BatchNorm statistics moved, dropout on."""
    torch.manual_seed(0)
    model = build_model(name, sizes, embed_dim=4, hidden_units=(16, 8), dropout=0.3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(20):
        ids = _ids(64, sizes, seed=step)
        y = (ids[:, 0] % 2).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(ids), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_serving_model_is_the_models_eval_forward(name):
    model = build_model(name, SIZES, embed_dim=4, hidden_units=(8,)).eval()
    with torch.no_grad():
        for p in model.parameters():  # embeddings start near zero: make every term count
            p.normal_(0, 0.5)
        ids = _ids(33)
        torch.testing.assert_close(ServingModel(model)(ids), model(ids), rtol=0, atol=1e-6)
        ens = EnsembleModel([model, model])(ids)
        torch.testing.assert_close(ens, model(ids), rtol=0, atol=1e-6)
        served = ServingModel(model.train())  # serving means eval mode, and stays so
        served.train()
        assert not served.training and not model.training
        torch.testing.assert_close(served(ids), ServingModel(model)(ids), rtol=0, atol=0)


def test_torchscript_export_equals_pytorch(tmp_path):
    model = _trained_student()
    model.train()  # exporting must not depend on the mode the model was left in
    doc = export_student(model, tmp_path, formats=["torchscript"])
    loaded = torch.jit.load(str(tmp_path / "student.torchscript.pt"))
    model.eval()
    for n in (1, 5, 300):  # traced at 8 rows; any batch size runs
        ids = _ids(n, seed=n)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=TOLERANCE)
    assert doc["checks"]["torchscript"]["within_tolerance"]
    assert doc["files"] == {"torchscript": "student.torchscript.pt"}
    assert json.loads((tmp_path / "serving.json").read_text())["input"] == {"name": "ids", "dtype": "int64",
                                                                           "shape": ["batch", len(SIZES)]}


@needs_onnx
def test_onnx_export_equals_pytorch_at_any_batch_size(tmp_path):
    model = _trained_student()
    doc = export_student(model, tmp_path, formats=["onnx"])
    session = _onnx.onnx_session(tmp_path / "student.onnx")
    for n in (1, 3, 1000):
        ids = _ids(n, seed=n)
        out = session.run(None, {"ids": ids.numpy()})[0]
        with torch.no_grad():
            ref = model(ids).numpy()
        assert out.shape == (n,)
        assert np.abs(out - ref).max() <= TOLERANCE
    assert doc["checks"]["onnx"]["within_tolerance"] and doc["checks"]["onnx"]["opset"]
    assert doc["files"]["onnx"] == ["student.onnx"]


def test_field_rules_follow_the_readers():
    assert field_rules("criteo", ["I1", "I13", "C1"]) == ["numeric", "numeric", "token"]
    assert field_rules("avazu", ["hour", "C1"]) == ["avazu_hour", "token"]
    assert field_rules("avazu", ["hour"], numeric=["hour"]) == ["numeric"]
    assert field_rules("csv", ["a", "price"], numeric=["price"]) == ["token", "numeric"]
    assert field_rules("libfm", ["f0", "f1"]) == ["token", "token"]


def _write_avazu(path, n=400, seed=0):
    rng = np.random.default_rng(seed)
    cols = ["id", "click", "hour", "C1", "site_id", "price"]
    rows = []
    for i in range(n):
        rows.append({"id": str(i), "click": str(int(rng.random() < 0.3)),
                     "hour": f"141021{rng.integers(0, 24):02d}",
                     "C1": "" if rng.random() < 0.1 else str(rng.integers(1000, 1010)),
                     "site_id": f"s{rng.integers(0, 40)}",
                     "price": "" if rng.random() < 0.1 else f"{rng.exponential(20):.2f}"})
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, cols)
        w.writeheader()
        w.writerows(rows)
    return rows


def test_raw_rows_encode_as_the_loader_did(tmp_path):
    # an Avazu-style file: hour (YYMMDDHH -> HH), a numeric column (bucketised), missing values, and
    # rows the vocabulary never saw; encoder.json written, read back, fed the file's raw rows
    path = tmp_path / "toy.csv"
    rows = _write_avazu(path)
    data, enc = load(f"avazu:{path}", numeric=["price"], return_encoder=True, min_count=2)
    raw = RawRowEncoder(enc, field_rules("avazu", enc.field_names, ["price"]))
    raw.save(tmp_path / "encoder.json")
    back = RawRowEncoder.load(tmp_path / "encoder.json")
    feats = [{k: v for k, v in r.items() if k not in ("id", "click")} for r in rows]
    np.testing.assert_array_equal(back.encode(feats), data.ids)
    columns = {name: [r[name] for r in rows] for name in back.field_names}  # the column form
    np.testing.assert_array_equal(back.encode(columns), data.ids)
    assert (data.ids == 1).any()  # some values rarer than min_count: the out-of-vocabulary id
    # typed values as a service would send them: numbers for numeric fields, None for missing
    typed = back.encode([{"hour": 14102105, "price": 3.5, "site_id": "s1", "C1": None}])
    assert typed.tolist() == back.encode([{"hour": "14102105", "price": "3.5", "site_id": "s1"}]).tolist()
    with pytest.raises(ValueError, match="'hour'.*not YYMMDDHH"):
        back.encode([{"hour": "2014-10-21"}])
    with pytest.raises(ValueError, match="not fields"):
        back.encode([{"sitee_id": "s1"}])
    # a partial state names the problem (was: a bare KeyError 'vocabs')
    state = back.state_dict()
    del state["encoder"]["vocabs"]
    with pytest.raises(ValueError, match="incomplete or malformed.*vocabs"):
        RawRowEncoder.from_state_dict(state)
    # one row passed as a dict (not a list of dicts) is refused, not read as columns of characters
    with pytest.raises(ValueError, match="pass one row as"):
        back.encode({name: feats[0].get(name, "") or "x" for name in back.field_names})


def test_criteo_rows_bucketise_their_integer_fields(tmp_path):
    rng = np.random.default_rng(0)
    lines, raw_rows = [], []
    for i in range(300):
        ints = ["" if rng.random() < 0.2 else str(int(rng.exponential(30)) - 2) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{rng.integers(0, 20):08x}" for _ in range(26)]
        lines.append("\t".join([str(int(rng.random() < 0.3))] + ints + cats))
        raw_rows.append(dict(zip([f"I{k}" for k in range(1, 14)] + [f"C{k}" for k in range(1, 27)], ints + cats)))
    path = tmp_path / "toy.txt"
    path.write_text("\n".join(lines) + "\n")
    data, enc = load(f"criteo:{path}", return_encoder=True)
    raw = RawRowEncoder(enc, field_rules("criteo", enc.field_names))
    np.testing.assert_array_equal(raw.encode(raw_rows), data.ids)


def test_onnx_missing_is_a_clear_error_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(_onnx, "onnx_missing", lambda: "onnxruntime not installed (pip install 'fastkd[serving]')")
    model = _trained_student()
    with pytest.raises(ImportError, match=r"fastkd\[serving\]"):
        export_student(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    export_student(model, tmp_path / "ts", formats=["torchscript"])  # TorchScript needs nothing more
    assert (tmp_path / "ts" / "student.torchscript.pt").is_file()


def test_serving_benchmark_rows_and_table_without_onnx():
    from fastkd.data import make_synthetic
    from fastkd.experiment.report import serving_table
    from fastkd.serving import serving_benchmark

    data = make_synthetic(500, seed=0)
    student = build_model("dnn", data.field_sizes, embed_dim=4, hidden_units=(8,))
    teachers = [build_model(n, data.field_sizes, embed_dim=4, hidden_units=(16,)) for n in ("deepfm", "dcn")]
    threads = torch.get_num_threads()
    sv = serving_benchmark(student, teachers, data, onnx=False, budget_s=0.0, student_label="dnn (gate)",
                           ensemble_label="teacher ensemble (deepfm, dcn)")
    assert torch.get_num_threads() == threads and student.training  # both as they were
    assert [(r["role"], r["runtime"], r["batch"]) for r in sv["rows"]] == [
        ("student", "pytorch", 1), ("student", "pytorch", 256), ("ensemble", "pytorch", 1),
        ("ensemble", "pytorch", 256)]
    assert all(r["calls"] >= 20 and 0 < r["p50_ms"] <= r["p99_ms"] for r in sv["rows"])  # 20 calls even at 0 s
    assert sv["rows"][2]["params"] == sum(p.numel() for t in teachers for p in t.parameters())
    table = serving_table([{"model": "dnn (gate)", "seed": 0, "serving": sv}])
    assert "| dnn (gate) | PyTorch |" in table and "× the ensemble's samples/s" in table
    assert "ONNX check skipped: not asked for" in table
    assert serving_table([{"model": "dnn", "seed": 0}]) == ""


def test_a_failing_onnx_export_is_reported_not_fatal(monkeypatch):
    # a long distill run must not be lost to its serving measurement: the table says what failed
    from fastkd.data import make_synthetic
    from fastkd.serving import serving_benchmark

    def fail(*a, **k):
        raise RuntimeError("exporter broke\nsecond line")
    monkeypatch.setattr(_onnx, "onnx_missing", lambda: "")
    monkeypatch.setattr(_onnx, "export_onnx", fail)
    data = make_synthetic(300, seed=0)
    model = build_model("dnn", data.field_sizes, embed_dim=4, hidden_units=(8,))
    sv = serving_benchmark(model, [model], data, budget_s=0.0)
    assert [r["runtime"] for r in sv["rows"]] == ["pytorch"] * 4 and sv["onnx_check"] is None
    assert sv["onnx_skipped"].startswith("the ONNX export or run failed (")


# ---------------------------------------------------------------------------------------------------
# fastkd distill -> <out>/student/ and the serving table -> fastkd export
# ---------------------------------------------------------------------------------------------------
def _write_csv(path, n=2000, seed=0):
    rng = np.random.default_rng(seed)
    site = rng.integers(0, 25, n)
    app = rng.integers(0, 12, n)
    price = rng.exponential(30, n)
    logit = np.sin(site) + 0.8 * (app % 3 - 1) + 0.02 * (price - 30)
    y = rng.random(n) < 1 / (1 + np.exp(-logit))
    rows = [{"label": str(int(y[i])), "site": f"site{site[i]}", "app": "" if app[i] == 0 else f"app{app[i]}",
             "price": "" if i % 17 == 0 else f"{price[i]:.1f}"} for i in range(n)]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["label", "site", "app", "price"])
        w.writeheader()
        w.writerows(rows)
    return rows


TINY = ["--teachers", "dnn,dnn", "--max-epochs", "1", "--threads", "1", "--embed-dim", "4", "--hidden-units", "16"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    threads = torch.get_num_threads()
    base = tmp_path_factory.mktemp("serving")
    data = base / "toy.csv"
    rows = _write_csv(data)
    out = base / "run"
    try:
        assert main(["distill", "--data", f"csv:{data}", "--numeric", "price", *TINY, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return {"base": base, "data": data, "rows": rows, "out": out}


def test_distill_saves_its_default_student_and_encoder(run):
    out = run["out"]
    saved = load_student(out)
    records = json.loads((out / "results.json").read_text())
    gate = next(r for r in records if r["role"] == "student" and r["distill"] == "gate")
    assert saved.info["row"] == gate["model"] and saved.info["seed"] == 0
    assert saved.info["test_auc"] == gate["auc"]
    _, _, test = load(f"csv:{run['data']}", numeric=["price"]).split((0.8, 0.1, 0.1), seed=0)
    np.testing.assert_array_equal(saved.check.ids, test.ids)  # the whole (small) test split
    with torch.no_grad():
        torch.testing.assert_close(saved.model(torch.from_numpy(test.ids)), saved.check_logits, rtol=0, atol=1e-6)
    assert saved.encoder is not None and saved.encoder.rules == ["token", "token", "numeric"]


def test_report_has_the_serving_table(run):
    report = (run["out"] / "report.md").read_text()
    assert "## Serving" in report
    table = [ln for ln in report.splitlines() if ln.startswith("| ") and ("PyTorch" in ln or "onnxruntime" in ln)]
    cells = {(ln.split(" | ")[0].lstrip("| "), ln.split(" | ")[1], ln.split(" | ")[3]) for ln in table}
    for batch in ("1", "256"):
        assert ("dnn (gate)", "PyTorch", batch) in cells
        assert ("teacher ensemble (dnn, dnn)", "PyTorch", batch) in cells
        if HAS_ONNX:
            assert ("dnn (gate)", "onnxruntime", batch) in cells
    serving = next(r for r in json.loads((run["out"] / "results.json").read_text()) if r.get("serving"))["serving"]
    assert all(r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"] and r["samples_per_s"] > 0 for r in serving["rows"])
    if HAS_ONNX:
        chk = serving["onnx_check"]
        assert chk["within_tolerance"] and chk["max_abs_diff"] <= 1e-5
        assert abs(chk["auc_exported"] - chk["auc_pytorch"]) < 1e-4
        assert "within the 1e-5 tolerance" in report
    else:
        assert "ONNX check skipped: onnx" in report


def test_resume_keeps_the_student_and_the_serving_table(run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    student = out / "student" / "student.pt"
    before = student.stat().st_mtime_ns
    threads = torch.get_num_threads()
    try:
        assert main(["distill", "--data", f"csv:{run['data']}", "--numeric", "price", *TINY, "--out", str(out),
                     "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert student.stat().st_mtime_ns == before  # every unit loaded: the student not saved again
    assert "## Serving" in (out / "report.md").read_text()


@pytest.mark.parametrize("formats", [["torchscript", "onnx"], ["torchscript"]], ids=["both", "torchscript"])
def test_fastkd_export_end_to_end(run, formats, capsys):
    if "onnx" in formats and not HAS_ONNX:
        pytest.skip("fastkd[serving] not installed")
    to = run["base"] / f"export-{len(formats)}"
    assert main(["export", "--run", str(run["out"]), "--to", str(to), "--format", ",".join(formats)]) == 0
    printed = capsys.readouterr().out
    assert "checked on all 200 rows of the run's test split" in printed
    doc = json.loads((to / "serving.json").read_text())
    assert set(doc["files"]) == set(formats) | {"encoder"}
    for name in ["pytorch_vs_saved", *formats]:
        assert doc["checks"][name]["within_tolerance"], name
    # serving from the files alone: raw rows -> encoder.json -> TorchScript / ONNX
    rows = run["rows"]
    raw = [{k: v for k, v in r.items() if k != "label"} for r in rows]
    ids = RawRowEncoder.load(to / "encoder.json").encode(raw)
    np.testing.assert_array_equal(ids, load(f"csv:{run['data']}", numeric=["price"]).ids)
    saved = load_student(run["out"])
    with torch.no_grad():
        ref = saved.model(torch.from_numpy(ids))
        ts = torch.jit.load(str(to / "student.torchscript.pt"))(torch.from_numpy(ids))
    assert (ts - ref).abs().max() <= TOLERANCE
    if "onnx" in formats:
        z = _onnx.run_onnx(_onnx.onnx_session(to / "student.onnx"), ids)
        assert np.abs(z - ref.numpy()).max() <= TOLERANCE
        records = json.loads((run["out"] / "results.json").read_text())
        gate_auc = next(r["auc"] for r in records if r["role"] == "student" and r["distill"] == "gate")
        assert abs(doc["checks"]["onnx"]["auc_exported"] - gate_auc) < 1e-4  # the report's test AUC


def test_synthetic_run_no_serving_then_export(tmp_path, capsys):
    # the generated-data path: no encoder; --no-serving leaves the report without the table
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["distill", "--data", "synthetic:2000", *TINY, "--no-serving", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "## Serving" not in (out / "report.md").read_text()
    assert main(["export", "--run", str(out), "--to", str(tmp_path / "exp"), "--format", "torchscript"]) == 0
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["serving.json", "student.torchscript.pt"]


def test_export_errors_name_the_problem(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path), "--to", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no saved student" in err and "one teacher trains no student" in err
    with pytest.raises(SystemExit):
        main(["export", "--run", str(tmp_path), "--to", str(tmp_path / "x"), "--format", "tflite"])
    assert "unknown format 'tflite'" in capsys.readouterr().err
    # a damaged student.pt is named as such
    model = _trained_student()
    from fastkd.serving import save_student
    from fastkd.train import CorruptArtifactError

    path = save_student(tmp_path / "s", model, name="dnn", model_kwargs={"embed_dim": 4, "hidden_units": (16, 8)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptArtifactError, match="student.pt: truncated"):
        load_student(tmp_path / "s")


def test_cli_formats_are_the_exporters():
    from fastkd.cli_args import EXPORT_FORMATS

    assert tuple(EXPORT_FORMATS) == tuple(FORMATS)


def test_export_into_an_earlier_export_leaves_none_of_its_files(run, tmp_path):
    # mutation caught: an export writing beside an earlier export's files (another format, another
    # run's encoder) without removing them first
    to = tmp_path / "serve"
    to.mkdir()
    for name in ("student.onnx", "student.onnx.data", "encoder.json", "serving.json"):
        (to / name).write_text("from an earlier export")
    (to / "serving.json").write_text(json.dumps({"files": {"onnx": ["student.onnx", "old.extra"]}}))
    (to / "old.extra").write_text("x")
    (to / "notes.txt").write_text("mine")
    doc = export_student(run["out"], to, formats="torchscript")  # one format as a string
    assert set(doc["files"]) == {"torchscript", "encoder"}
    assert sorted(p.name for p in to.iterdir()) == ["encoder.json", "notes.txt", "serving.json",
                                                    "student.torchscript.pt"]
    assert RawRowEncoder.load(to / "encoder.json").field_names == load_student(run["out"]).encoder.field_names


def test_export_refuses_an_encoder_of_other_fields(run, tmp_path):
    # mutation caught: only the field sizes compared (another run's encoder.json of the same sizes ships)
    saved = load_student(run["out"])
    enc = saved.encoder
    st = enc.state_dict()
    st["encoder"] = {**st["encoder"], "field_names": [n + "_x" for n in enc.field_names]}
    other = RawRowEncoder.from_state_dict(st)
    with pytest.raises(ValueError, match="encoder's fields .* are not the fields the student was trained on"):
        export_student(run["out"], tmp_path / "x", formats=["torchscript"], encoder=other)


def test_export_names_a_source_it_cannot_export(tmp_path):
    # mutation caught: pathlib's "expected str, bytes or os.PathLike object, not Linear"
    with pytest.raises(TypeError, match="source must be a fastkd CTRModel or the path of a run"):
        export_student(torch.nn.Linear(3, 1), tmp_path / "x", formats="torchscript")


def test_a_saved_student_missing_its_encoder_is_refused(run, tmp_path):
    # mutation caught: an export of a file-data run whose encoder.json went missing shipping no encoder
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run["out"] / "student", out / "student")
    assert load_student(out).info.get("encoder_file") == "encoder.json"
    (out / "student" / "encoder.json").unlink()
    with pytest.raises(FileNotFoundError, match="encoder.json is missing: the run that saved"):
        load_student(out)
    with pytest.raises(FileNotFoundError, match="encoder.json is missing"):
        export_student(out, tmp_path / "x", formats="torchscript")
