"""Artifacts on disk (checkpoints, teacher caches): a manifest in each, and a clear error naming
the file for one made by another run ("... differs") or one that is truncated or corrupt; a cache
that fails its checks is rebuilt by a build and refused by a load."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import quick_config, small_model
from fastkd import Distiller, TeacherCache
from fastkd.data import CTRData, make_synthetic
from fastkd.train import train_model
from fastkd.train.checkpoint import load_checkpoint
from fastkd.train.manifest import ArtifactError, ArtifactMismatchError, CorruptArtifactError


@pytest.fixture(scope="module")
def splits():
    return make_synthetic(1200, seed=3).split((0.7, 0.15, 0.15), seed=0)


def _train(model, train, valid, ckpt, resume=False, stop=1, **kw):
    """``train_model`` with a checkpoint, stopped (as by a crash) after ``stop`` epochs."""
    try:
        return train_model(model, train, valid, quick_config(max_epochs=3, patience=3, **kw), checkpoint=ckpt,
                           resume=resume, stop_after_epoch=stop)
    except KeyboardInterrupt:
        return None


def _message_names(exc_info, path, *words):
    """The message names ``path`` and, elsewhere than in the path, each of ``words``."""
    msg = str(exc_info.value)
    assert str(path) in msg, msg
    rest = msg.replace(str(path), "")
    for w in words:
        assert w in rest, msg


def _flip_labels(data: CTRData) -> CTRData:
    labels = data.labels.copy()
    labels[0] = 1.0 - labels[0]
    return CTRData(data.ids, labels, data.field_names, data.field_sizes)


# --------------------------------------------------------------------------------------------
# checkpoints: made by another run
# --------------------------------------------------------------------------------------------
def test_distiller_refuses_to_resume_a_checkpoint_of_a_smaller_run(tmp_path):
    """The issue's case: a 3,000-row run's checkpoints resumed into a 6,000-row run."""
    def run(rows, resume):
        train, valid, _ = make_synthetic(rows, seed=3).split((0.7, 0.15, 0.15), seed=0)
        fs = train.field_sizes
        kd = Distiller([small_model("dnn", fs, 1)], small_model("dnn", fs, 3), gate="mean", augment=0,
                       config=quick_config(max_epochs=1))
        kd.fit(train, valid, checkpoint_dir=tmp_path, resume=resume)
        return len(train)

    small_rows = run(3000, resume=False)
    with pytest.raises(ArtifactMismatchError) as err:
        run(6000, resume=True)
    assert isinstance(err.value, ValueError)
    assert err.value.field == "data.rows"
    assert (err.value.expected, err.value.found) == (2 * small_rows, small_rows)
    _message_names(err, tmp_path / "teacher0.pt", "data.rows", str(small_rows), str(2 * small_rows))


@pytest.mark.parametrize("change,field", [
    ("rows", "data.rows"),
    ("labels", "data.labels"),
    ("valid", "monitor_data.ids"),
    ("lr", "config.lr"),
    ("seed", "config.seed"),
    ("width", "shapes.model."),
])
def test_train_model_resume_names_the_field_that_differs(tmp_path, splits, change, field):
    train, valid, _ = splits
    fs = train.field_sizes
    ckpt = tmp_path / "m.pt"
    _train(small_model("dnn", fs), train, valid, ckpt)
    model, kw = small_model("dnn", fs), {}
    if change == "rows":
        train = train.subset(np.arange(len(train) - 1))
    elif change == "labels":
        train = _flip_labels(train)
    elif change == "valid":
        valid = valid.subset(np.arange(len(valid))[::-1])  # same rows, other order
    elif change in ("lr", "seed"):
        kw = {change: {"lr": 0.01, "seed": 1}[change]}
    else:
        torch.manual_seed(0)
        from fastkd.models import build_model
        model = build_model("dnn", fs, embed_dim=4, hidden_units=(8,), dropout=0.0)
    with pytest.raises(ArtifactMismatchError) as err:
        _train(model, train, valid, ckpt, resume=True, stop=None, **kw)
    assert err.value.field.startswith(field)
    _message_names(err, ckpt, field, "expected", "found")


def test_student_checkpoint_of_other_teachers_is_refused(tmp_path, splits):
    """Trained teachers passed in: the student's targets come from them, so a student.pt written
    with other teachers' weights must not be resumed."""
    train, valid, _ = splits
    fs = train.field_sizes

    def run(teacher_seed, resume, stop):
        kd = Distiller([small_model("dnn", fs, teacher_seed)], small_model("dnn", fs, 3), gate="mean", augment=0,
                       teachers_trained=True, config=quick_config(max_epochs=3, patience=3))
        kd.fit(train, valid, checkpoint_dir=tmp_path, resume=resume, stop_after_epoch=stop)

    with pytest.raises(KeyboardInterrupt):
        run(1, False, 1)
    with pytest.raises(ArtifactMismatchError) as err:
        run(2, True, None)
    assert err.value.field == "teachers.weights"
    _message_names(err, tmp_path / "student.pt", "teachers.weights")


def test_resume_may_change_max_epochs_and_progress(tmp_path, splits):
    """Fields that do not change a run's numbers are free: resuming with a larger max_epochs
    continues the same run, and equals the uninterrupted one."""
    train, valid, test = splits
    fs = train.field_sizes
    full = small_model("dnn", fs)
    train_model(full, train, valid, quick_config(max_epochs=3, patience=3))
    _train(small_model("dnn", fs), train, valid, tmp_path / "m.pt")
    resumed = small_model("dnn", fs)
    train_model(resumed, train, valid, quick_config(max_epochs=3, patience=3, progress=None),
                checkpoint=tmp_path / "m.pt", resume=True)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_without_manifest_is_refused(tmp_path, splits):
    train, valid, _ = splits
    ckpt = tmp_path / "m.pt"
    _train(small_model("dnn", train.field_sizes), train, valid, ckpt)
    state = torch.load(ckpt, weights_only=False)
    del state["manifest"]
    torch.save(state, ckpt)  # what an older fastkd wrote
    with pytest.raises(ArtifactMismatchError) as err:
        _train(small_model("dnn", train.field_sizes), train, valid, ckpt, resume=True)
    assert err.value.field == "format_version"
    _message_names(err, ckpt, "format_version", "no manifest")


# --------------------------------------------------------------------------------------------
# checkpoints: truncated or corrupt
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage,problem", [("half", "truncated"), ("empty", "truncated"),
                                            ("garbage", "corrupt"), ("tampered", "corrupt")])
def test_damaged_checkpoint_names_the_file_and_the_problem(tmp_path, splits, damage, problem):
    train, valid, _ = splits
    ckpt = tmp_path / "m.pt"
    _train(small_model("dnn", train.field_sizes), train, valid, ckpt)
    raw = ckpt.read_bytes()
    if damage == "half":
        ckpt.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "garbage":
        ckpt.write_bytes(np.random.default_rng(0).bytes(len(raw)))
    else:  # one weight changed after the manifest was written: loads, but fails its checksum
        state = torch.load(ckpt, weights_only=False)
        w = next(v for v in state["modules"]["model"].values() if v.is_floating_point())
        w.view(-1)[0] += 1.0
        torch.save(state, ckpt)
    with pytest.raises(CorruptArtifactError) as err:
        _train(small_model("dnn", train.field_sizes), train, valid, ckpt, resume=True)
    assert err.value.problem == problem and isinstance(err.value, ValueError)
    _message_names(err, ckpt, problem)


def test_load_checkpoint_checks_fields_in_order(tmp_path, splits):
    """The first differing field is the one named (data before config before shapes)."""
    train, valid, _ = splits
    ckpt = tmp_path / "m.pt"
    _train(small_model("dnn", train.field_sizes), train, valid, ckpt)
    found = torch.load(ckpt, weights_only=False)["manifest"]
    expected = {k: found[k] for k in ("data", "config", "shapes")}
    expected["config"] = {**expected["config"], "lr": 1.0}
    expected["data"] = {**expected["data"], "rows": 5}
    with pytest.raises(ArtifactMismatchError, match=r"data.rows differs: expected 5 \(this run\), found"):
        load_checkpoint(ckpt, expected)
    assert load_checkpoint(ckpt, {k: found[k] for k in ("data", "config", "shapes")})["epoch"] == 1


# --------------------------------------------------------------------------------------------
# teacher caches
# --------------------------------------------------------------------------------------------
@pytest.fixture
def cache(tmp_path, splits):
    """A teacher cache with hidden vectors on disk, its rows, teachers and in-memory twin."""
    train, _, _ = splits
    teachers = [small_model("dnn", train.field_sizes, 1), small_model("deepfm", train.field_sizes, 2)]
    path = tmp_path / "cache"
    TeacherCache.build(teachers, train, hidden=True, path=path)
    mem = TeacherCache.build(teachers, train, hidden=True)
    return path, train, teachers, mem


def _same(cache_a, cache_b, n):
    idx = torch.arange(n)
    for a, b in zip(cache_a.gather(idx), cache_b.gather(idx)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _truncate(f, keep=0.5):
    raw = f.read_bytes()
    f.write_bytes(raw[: int(len(raw) * keep)])


def test_cache_manifest_records_rows_teachers_and_checksums(cache):
    path, train, teachers, mem = cache
    meta = json.loads((path / "cache.json").read_text())
    assert meta["format_version"] == 1 and meta["rows"] == len(train) and meta["teachers"] == 2
    assert meta["data"]["rows"] == len(train) and meta["data"]["fields"] == len(train.field_sizes)
    assert set(meta["files"]) == {"logits.npy", "hidden.npy"}
    assert meta["files"]["logits.npy"]["bytes"] == (path / "logits.npy").stat().st_size
    assert set(meta["models"]["shapes"]) == {"0", "1"}
    _same(TeacherCache.load(path, data=train, teachers=teachers), mem, len(train))


# the word each damage must be named by: (damage, file) cases per problem
_DAMAGES = {
    "truncated": [("truncate", "logits.npy"), ("truncate", "hidden.npy"), ("truncate", "cache.json"),
                  ("empty", "cache.json")],
    "corrupt": [("flip", "logits.npy"), ("float64", "logits.npy"), ("npy_header", "logits.npy"),
                ("delete", "hidden.npy"), ("garbage", "cache.json"), ("drop_hidden_dim", "cache.json"),
                ("old_incomplete", "cache.json")],
}


@pytest.mark.parametrize("damage,name,problem", [(d, n, p) for p, cases in _DAMAGES.items() for d, n in cases])
def test_damaged_cache_is_an_error_on_load_and_rebuilt_by_build(cache, damage, name, problem):
    path, train, teachers, mem = cache
    f = path / name
    if damage == "truncate":
        _truncate(f)
    elif damage == "flip":  # same size, one logit's bytes changed
        raw = bytearray(f.read_bytes())
        raw[-1] ^= 0xFF
        f.write_bytes(bytes(raw))
    elif damage == "float64":  # the case: NaN float64 of the right shape
        np.save(f, np.full((len(train), 2), np.nan))
    elif damage == "npy_header":
        raw = bytearray(f.read_bytes())
        raw[:6] = b"garbag"
        f.write_bytes(bytes(raw))
    elif damage == "delete":
        f.unlink()
    elif damage == "garbage":
        f.write_bytes(b"\x00\xff not json at all")
    elif damage == "empty":
        f.write_text("")
    elif damage == "drop_hidden_dim":
        meta = json.loads(f.read_text())
        del meta["hidden_dim"]
        f.write_text(json.dumps(meta))
    elif damage == "old_incomplete":  # the KeyError: 'hidden_dim'
        f.write_text(json.dumps({"rows": len(train), "teachers": 2}))
    with pytest.raises(CorruptArtifactError) as err:
        TeacherCache.load(path)
    assert err.value.problem == problem and err.value.path == f
    _message_names(err, f, problem)
    if damage == "drop_hidden_dim":
        _message_names(err, f, "hidden_dim")
    # building over it never reads it: a complete, correct cache again
    rebuilt = TeacherCache.build(teachers, train, hidden=True, path=path)
    _same(rebuilt, mem, len(train))
    _same(TeacherCache.load(path), mem, len(train))


def test_from_arrays_rebuilds_a_damaged_cache(cache):
    path, train, teachers, mem = cache
    _truncate(path / "logits.npy")
    (path / "cache.json").write_text("{")
    z, h = mem.gather(torch.arange(len(train)))
    TeacherCache.from_arrays(z.numpy(), h.numpy(), path=path, data=train, teachers=teachers)
    _same(TeacherCache.load(path, data=train, teachers=teachers), mem, len(train))


def test_cache_of_an_older_fastkd_is_refused(cache):
    path, train, _, _ = cache
    (path / "cache.json").write_text(json.dumps({"rows": len(train), "teachers": 2, "hidden_dim": 16}))
    with pytest.raises(ArtifactMismatchError) as err:
        TeacherCache.load(path)
    assert err.value.field == "format_version"
    _message_names(err, path / "cache.json", "format_version", "older fastkd")


@pytest.mark.parametrize("other,field", [("rows", "data.rows"), ("ids", "data.ids"), ("teachers", "models.weights")])
def test_cache_loaded_for_other_rows_or_teachers_is_refused(cache, other, field):
    path, train, teachers, _ = cache
    kw = {"data": train, "teachers": teachers}
    if other == "rows":
        kw["data"] = train.subset(np.arange(10))
    elif other == "ids":
        ids = train.ids.copy()
        ids[[0, 1]] = ids[[1, 0]]
        kw["data"] = CTRData(ids, train.labels, train.field_names, train.field_sizes)
    else:
        kw["teachers"] = [teachers[0], small_model("deepfm", train.field_sizes, 9)]
    with pytest.raises(ArtifactMismatchError) as err:
        TeacherCache.load(path, **kw)
    assert err.value.field == field
    _message_names(err, path / "cache.json", field)
    # labels are not the cache's business: the same ids with other labels load
    TeacherCache.load(path, data=_flip_labels(train))


def test_truncated_part_of_a_sharded_cache_names_the_part(tmp_path, splits):
    train, _, _ = splits
    teachers = [small_model("dnn", train.field_sizes, 1)]
    path = tmp_path / "parts"
    ref = TeacherCache.build(teachers, train, path=path, shard=True)  # one rank: one part
    meta = json.loads((path / "cache.json").read_text())
    part = path / meta["parts"][0]["logits"]
    _same(TeacherCache.load(path), ref, len(train))
    _truncate(part, 0.9)
    with pytest.raises(CorruptArtifactError) as err:
        TeacherCache.load(path)
    assert err.value.problem == "truncated" and err.value.path == part
    _message_names(err, part, "truncated")


def test_load_without_checksums_still_checks_size_dtype_and_shape(cache):
    """``verify=False`` skips the checksum read only: float64 logits of the same byte count
    ([N, 1] where float32 [N, 2] was) are still refused."""
    path, train, _, mem = cache
    _same(TeacherCache.load(path, verify=False), mem, len(train))
    f = path / "logits.npy"
    size = f.stat().st_size
    np.save(f, np.full((len(train), 1), np.nan))
    assert f.stat().st_size == size
    with pytest.raises(CorruptArtifactError) as err:
        TeacherCache.load(path, verify=False)
    assert err.value.problem == "corrupt"
    _message_names(err, f, "float64", str([len(train), 1]))


def test_distiller_rebuilds_a_damaged_cache_dir(tmp_path, splits):
    """A cache_dir left damaged (here: a truncated logits file and cache.json) by an earlier run is
    rebuilt by fit, which gives the run without cache_dir."""
    train, valid, test = splits
    fs = train.field_sizes

    def run(cache_dir):
        kd = Distiller([small_model("dnn", fs, 1)], small_model("dnn", fs, 3), gate="mean", augment=0.5,
                       teachers_trained=True, config=quick_config(max_epochs=1), cache_dir=cache_dir)
        kd.fit(train, valid)
        return kd.predict(test)

    ref = run(None)
    run(tmp_path / "c")
    _truncate(tmp_path / "c" / "logits.npy")
    _truncate(tmp_path / "c" / "cache.json")
    torch.testing.assert_close(run(tmp_path / "c"), ref, rtol=0, atol=0)
    TeacherCache.load(tmp_path / "c")  # and what it left is whole


def test_artifact_errors_are_value_errors():
    assert issubclass(ArtifactMismatchError, ArtifactError) and issubclass(CorruptArtifactError, ArtifactError)
    assert issubclass(ArtifactError, ValueError)
    with pytest.raises(ValueError, match="truncated"):
        CorruptArtifactError("x", "broken", "")
