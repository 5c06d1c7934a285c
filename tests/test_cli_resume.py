"""`fastkd distill --resume` after a real `kill -9`, and what a run does with an `--out` holding an earlier one.

One module-scoped scenario (about 15 s on 2 cores): an uninterrupted reference run; a second run of
the same command into a copy of the reference's folder (an earlier complete run), killed with
SIGKILL once the teachers and the plain DNN have finished and the first student is between
epochs; then the same command with ``--resume``, in process, with the training loop spied on.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import REPO
from fastkd.cli import main

ARGS = ["distill", "--data", "synthetic:3000", "--teachers", "dnn,dnn", "--max-epochs", "3", "--seeds", "1",
        "--embed-dim", "4", "--hidden-units", "16", "--batch-size", "256", "--threads", "1"]
# what a record's numbers are; timings (seconds, samples/s) differ between any two runs
KEYS = ("model", "role", "distill", "variant", "seed", "auc", "logloss", "epochs", "best_epoch", "params", "gate",
        "augmented_rows", "teacher")
SEED0 = ("checkpoints", "seed0")


def _metrics(out):
    return [{k: r.get(k) for k in KEYS} for r in json.loads((out / "results.json").read_text())]


def _first_line(path):
    return path.read_text().splitlines()[0]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    threads = torch.get_num_threads()
    base = tmp_path_factory.mktemp("resume")
    ref, run = base / "ref", base / "run"
    try:
        assert main([*ARGS, "--out", str(ref)]) == 0
        shutil.copytree(ref, run)  # an earlier complete run in --out
        # the same command in a subprocess, killed once student-mean has a checkpoint (after its first
        # epoch of three): teachers and plain DNN finished, a student in training
        ckpt = run.joinpath(*SEED0)
        # the first of the default student-dropout candidates (0.1/0.3)
        wait = ckpt / "student-mean" / "candidate0-dropout0.1" / "student.pt"
        proc = subprocess.Popen([sys.executable, "-m", "fastkd", *ARGS, "--out", str(run)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        t0 = time.monotonic()
        while not wait.exists() and proc.poll() is None and time.monotonic() - t0 < 120:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        lifetime = time.monotonic() - t0
        killed_out = proc.communicate()[0]
        assert proc.returncode == -signal.SIGKILL, killed_out
        at_kill = {
            "files": sorted(p.name for p in run.iterdir()),
            "ckpt": sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*")),
            "report_first_line": _first_line(run / "report.md"),
            "partial_rows": len(json.loads((run / "results.partial.json").read_text())),
            "mtimes": {n: (ckpt / n).stat().st_mtime_ns for n in ("teachers.finished.json", "plain.finished.json")},
            "stdout": killed_out,
            "wall": json.loads((ckpt.parent / "wall.json").read_text())["seconds"],
            "lifetime": lifetime,
        }
        # as if the killed process had run for 1000 s: the resumed report must add exactly that
        (ckpt.parent / "wall.json").write_text(json.dumps({"seconds": 1000.0}))
        # --resume, in process: count the batches every training loop runs
        from fastkd.train.loop import _Loop

        loops = []
        orig = _Loop.run

        def spy(self, ids, labels, step, monitor):
            n = [0]

            def counted(*a):
                n[0] += 1
                return step(*a)
            summary = orig(self, ids, labels, counted, monitor)
            loops.append((self.desc, n[0]))
            return summary

        mp = pytest.MonkeyPatch()
        mp.setattr(_Loop, "run", spy)
        try:
            import io
            from contextlib import redirect_stdout

            buf = io.StringIO()
            t1 = time.monotonic()
            with redirect_stdout(buf):
                code = main([*ARGS, "--out", str(run), "--resume"])
            at_kill["resumed_for"] = time.monotonic() - t1
        finally:
            mp.undo()
        assert code == 0, buf.getvalue()
        yield {"ref": ref, "run": run, "ckpt": ckpt, "at_kill": at_kill, "loops": loops, "stdout": buf.getvalue()}
    finally:
        torch.set_num_threads(threads)


def test_kill_9_then_resume_gives_the_uninterrupted_results(scenario):
    at_kill = scenario["at_kill"]
    # killed where intended: teachers and plain DNN finished, student-mean between epochs
    assert {"teachers.finished.json", "plain.finished.json", "student-mean/candidate0-dropout0.1/student.pt"} <= set(at_kill["ckpt"])
    assert "student-mean.finished.json" not in at_kill["ckpt"]
    assert _metrics(scenario["run"]) == _metrics(scenario["ref"])
    assert len(_metrics(scenario["ref"])) == 7  # 2 teachers, ensemble, plain, mean and gate students, gate ensemble


def test_resume_retrains_no_finished_model(scenario):
    loops = scenario["loops"]
    # teachers: loaded from their finished checkpoints (zero batches); the plain DNN: not even loaded
    assert [n for d, n in loops if d.startswith("teacher")] == [0, 0]
    assert not [d for d, _ in loops if d == "plain student"]
    # student-mean's first dropout candidate resumed after its checkpointed epoch(s); its second
    # candidate and student-gate's two trained from scratch (unless the gate was not kept: the
    # gated student is then the mean student, reused)
    students = [n for d, n in loops if d == "student"]
    records = json.loads((scenario["run"] / "results.json").read_text())
    gated = next(r for r in records if r["model"] == "dnn (gate)")
    if "student_from" in gated:
        (mean, mean_second), gate = students, None
        assert 0 < mean and mean_second > 0
    else:
        (mean, mean_second, gate, gate_second) = students
        assert 0 < mean < gate and mean_second > 0 and gate_second > 0
    out = scenario["stdout"]
    assert out.count("(finished earlier: loaded)") == 4  # two teachers, their ensemble, the plain DNN
    ckpt = scenario["ckpt"]
    for name, mtime in scenario["at_kill"]["mtimes"].items():
        assert (ckpt / name).stat().st_mtime_ns == mtime, f"{name} rewritten"
    assert "4 of these rows were loaded" in (scenario["run"] / "report.md").read_text()


def test_resumed_report_counts_the_killed_process_wall_time(scenario):
    # mutation caught: the resumed report timing only its own process (the killed one's time lost)
    at_kill = scenario["at_kill"]
    # the killed process saved its time up to its last finished model: no more than it lived, and
    # not the earlier complete run's (its wall.json went with its checkpoints)
    assert 0 < at_kill["wall"] <= at_kill["lifetime"] + 1.0
    wall = json.loads((scenario["ckpt"].parent / "wall.json").read_text())["seconds"]
    assert 1000.0 < wall <= 1000.0 + at_kill["resumed_for"]  # the planted earlier time, plus its own
    report = (scenario["run"] / "report.md").read_text()
    assert f"Wall time: {wall:.0f} s" in report
    assert "adds each earlier process's time" in report


def test_fresh_run_clears_an_earlier_run_and_marks_its_report_partial(scenario):
    at_kill = scenario["at_kill"]
    # the earlier complete run's results went first, and said so; the new run's report is marked partial
    assert "removing an earlier run's report.md, results.json, auc.png, gate_weights.png, checkpoints/" \
        in at_kill["stdout"]
    assert "results.json" not in at_kill["files"] and "auc.png" not in at_kill["files"]
    assert "student-gate.finished.json" not in at_kill["ckpt"]  # the earlier run's finished records too
    assert "PARTIAL" in at_kill["report_first_line"] and at_kill["partial_rows"] == 4
    # finished: the report is whole, the partial records are gone
    run = scenario["run"]
    assert _first_line(run / "report.md") == "# fastkd distillation report"
    assert not (run / "results.partial.json").exists()


def test_resume_refuses_other_settings_naming_the_setting(scenario, capsys):
    run = scenario["run"]
    before = (run / "results.json").stat().st_mtime_ns
    assert main([*ARGS, "--out", str(run), "--resume", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "--resume: --lr (config.lr) differs" in err and "0.01" in err and "0.001" in err
    assert main([*ARGS, "--out", str(run), "--resume", "--split-seed", "1"]) == 2
    assert "the data (data.train.ids" in capsys.readouterr().err
    assert (run / "results.json").stat().st_mtime_ns == before  # refused before anything was removed


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    out = tmp_path / "never-ran"
    assert main([*ARGS, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and str(out / "checkpoints" / "run.json") in err
    assert not out.exists()
    # a run.json that is not JSON: named, and said to be corrupt
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "run.json").write_text("{garbage")
    assert main([*ARGS, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "run.json" in err and ("corrupt" in err or "truncated" in err)


def test_resume_adds_seeds_to_a_finished_run(scenario, tmp_path, capsys):
    # a finished one-seed run, resumed with --seeds 2: seed 0 loaded (nothing trained), seed 1 trained,
    # and every row equals a fresh two-seed run's
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    shutil.copytree(scenario["ref"], grown)
    two = [a if a != "1" or ARGS[i - 1] != "--seeds" else "2" for i, a in enumerate(ARGS)]
    assert main([*two, "--out", str(fresh)]) == 0
    capsys.readouterr()
    assert main([*two, "--out", str(grown), "--resume"]) == 0
    out = capsys.readouterr().out
    assert out.count("(finished earlier: loaded)") == 7  # every seed-0 row
    assert _metrics(grown) == _metrics(fresh)
    assert json.loads((grown / "checkpoints" / "run.json").read_text())["seeds"] == [0, 1]
    # fewer seeds than the saved run is another run: refused, naming --seeds
    assert main([*ARGS, "--out", str(grown), "--resume"]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_resume_adds_ablation_rows_after_the_saved_ones(scenario, tmp_path, capsys):
    # a finished run without ablations, resumed with two: every saved row loaded, the new rows
    # trained, all equal to a fresh run's with those ablations
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    shutil.copytree(scenario["ref"], grown)
    more = [*ARGS, "--ablations", "augment=0,student_dropout=0"]
    assert main([*more, "--out", str(fresh)]) == 0
    capsys.readouterr()
    assert main([*more, "--out", str(grown), "--resume"]) == 0
    assert capsys.readouterr().out.count("(finished earlier: loaded)") == 7
    assert _metrics(grown) == _metrics(fresh)
    # student_dropout changes the plain DNN too: the row brings its own plain DNN
    plain = {r["variant"]: r["auc"] for r in json.loads((grown / "results.json").read_text()) if r["model"] == "dnn"}
    assert set(plain) == {"", "student_dropout=0"} and plain[""] != plain["student_dropout=0"]
    # rows must come after the saved ones (a unit is named by its position): another order is refused
    assert main([*ARGS, "--ablations", "student_dropout=0,augment=0", "--out", str(grown), "--resume"]) == 2
    assert "--ablations" in capsys.readouterr().err


def test_settings_added_later_leave_an_older_run_json_unchanged():
    # teacher_rows and student_dropout came after format 1: at their old values (train, None) they
    # are not in the manifest (a run started before them resumes), set they are (another run; the
    # default student dropout candidates since round 10 too)
    from fastkd.data import make_synthetic
    from fastkd.experiment import ExperimentSpec
    from fastkd.experiment.resume import run_id, run_manifest
    from fastkd.train import TrainConfig

    train, valid, test = make_synthetic(300, seed=0).split((0.8, 0.1, 0.1))
    cfg = TrainConfig(merge_validation=True)
    base = run_manifest(ExperimentSpec(config=cfg, student_dropout=None), train, valid, test)
    assert "teacher_rows" not in base and "student_dropout" not in base
    for kw in ({"teacher_rows": "merged", "student_dropout": None}, {"student_dropout": 0.1}, {}):
        m = run_manifest(ExperimentSpec(config=cfg, **kw), train, valid, test)
        assert run_id(m) != run_id(base)
        for k, v in kw.items():
            assert m.get(k) == v
    assert run_manifest(ExperimentSpec(config=cfg), train, valid, test)["student_dropout"] == [0.1, 0.3]
    # seeds and ablations are what a resumed run may add: the id leaves them out
    grown = ExperimentSpec(config=cfg, seeds=[0, 1], ablations=["augment=0"], student_dropout=None)
    assert run_id(run_manifest(grown, train, valid, test)) == run_id(base)


def test_bad_student_options_are_refused_before_training(tmp_path, capsys):
    assert main([*ARGS, "--student-dropout", "1.5", "--out", str(tmp_path / "o")]) == 2
    assert "student_dropout must be None, a number in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        main([*ARGS, "--teacher-rows", "valid", "--out", str(tmp_path / "o")])
    assert "--teacher-rows" in capsys.readouterr().err
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_a_run_started_before_ablation_rows_could_be_added_still_resumes(scenario, tmp_path, capsys):
    # its finished records carry the old id (the manifest's digest without seeds alone, ablations
    # in): they are loaded, also on a second resume after run.json was rewritten
    from fastkd.train.manifest import state_digest

    old = tmp_path / "old"
    shutil.copytree(scenario["ref"], old)
    ckpt = old / "checkpoints"
    saved = json.loads((ckpt / "run.json").read_text())
    legacy = state_digest({k: v for k, v in saved.items() if k != "seeds"})
    for f in ckpt.rglob("*.finished.json"):
        rec = json.loads(f.read_text())
        f.write_text(json.dumps({**rec, "run": legacy}))
    more = [*ARGS, "--ablations", "augment=0"]
    assert main([*more, "--out", str(old), "--resume"]) == 0
    assert capsys.readouterr().out.count("(finished earlier: loaded)") == 7
    assert json.loads((ckpt / "run.json").read_text())["legacy_run_id"] == legacy
    assert main([*more, "--out", str(old), "--resume"]) == 0
    assert capsys.readouterr().out.count("(finished earlier: loaded)") == 9  # the new row's two too
    # a record of another run is still refused
    f = next(ckpt.rglob("plain.finished.json"))
    f.write_text(json.dumps({**json.loads(f.read_text()), "run": "0" * 32}))
    assert main([*more, "--out", str(old), "--resume"]) == 2
    assert "written by another run" in capsys.readouterr().err
