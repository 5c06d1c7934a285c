"""Distillation under torch.distributed: 2 gloo processes on loopback against one process.

The worker processes are this file run as a script (``python test_distributed.py SPEC.json``)
with the environment torchrun would give them (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free
MASTER_PORT), so the ``env://`` path that torchrun uses is the one under test. Every launch has a
wall-clock bound; a hung rank is killed and the test fails instead of blocking the suite.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastkd import Distiller, TeacherCache, TrainConfig
from fastkd import distributed
from fastkd.data import make_synthetic
from fastkd.models import build_model
from fastkd.train import evaluate, train_model
from fastkd.train.evaluation import _label_monitor

# Dropout 0 for the runs compared with one process: per-rank dropout masks are what make a
# 2-rank step differ from a single-process step by more than summation order. The distillation
# run has no BatchNorm; a separate BatchNorm model checks that BatchNorm under DDP uses the global
# batch's statistics (fastkd.distributed.sync_batch_norm) and so matches one process too.
SMALL = dict(embed_dim=4, hidden_units=(16,), dropout=0.0, batch_norm=False)
# 1400 training rows and a global batch of 256: both even, and the last batch (120 rows) is not
# folded, so the 2-rank steps cover exactly the single-process batches (see shard_permutation)
CFG = dict(max_epochs=3, batch_size=256, lr=0.01, progress=False, early_stop="kd")
# bounds, not expectations (a launch takes ~10 s on a quiet 2-core machine): generous because
# the machine running the suite may be busy, and a hang must still end in a failure
LAUNCH_TIMEOUT_S = 240
COLLECTIVE_TIMEOUT_S = 120
# test AUC of the 2-rank run against one process. Both runs take the same optimisation steps on
# the same rows; they differ only in float32 summation order (two half-batch gradients averaged
# by all-reduce against one full-batch sum, ~1e-7 relative per step). Over ~20 Adam steps that
# moves parameters by ~1e-6, far from reordering two test scores often enough to move the AUC by
# 1e-4 (300 test rows: one swapped pair moves it by ~4e-5, so this admits at most two swaps).
AUC_TOL = 1e-4


def _splits():
    return make_synthetic(2000, seed=3).split((0.7, 0.15, 0.15), seed=0)


def _model(name, fs, seed, batch_norm=False):
    torch.manual_seed(seed)
    return build_model(name, fs, **{**SMALL, "batch_norm": batch_norm})


def _distiller(fs, out: Path) -> Distiller:
    teachers = [_model("deepfm", fs, 1), _model("dcn", fs, 2)]
    # the paper's path (joint logit gate, no augmentation): the kill step below counts its batches
    return Distiller(teachers, _model("dnn", fs, 3), gate="logit", augment=0, config=TrainConfig(**CFG),
                     teacher_config=TrainConfig(**{**CFG, "max_epochs": 1, "early_stop": "auc"}),
                     cache_dir=out / "student_cache")


def _augmented_distiller(fs, cache_dir: Path, row_blocks=None) -> Distiller:
    """The default pre-train path at scale: merged validation, teacher-labelled augmentation, a
    stacked feature gate, and the teacher cache, augmented rows and targets in files."""
    return Distiller([_model("deepfm", fs, 8), _model("dcn", fs, 9)], _model("dnn", fs, 10), augment=1.0,
                     config=TrainConfig(**{**CFG, "max_epochs": 2, "early_stop": "auc", "merge_validation": True,
                                           "row_blocks": row_blocks}),
                     teacher_config=TrainConfig(**{**CFG, "max_epochs": 1, "early_stop": "auc"}),
                     cache_dir=cache_dir)


def _fixed_teachers(fs):
    return [_model("dnn", fs, 11), _model("deepfm", fs, 12)]


# ------------------------------------------------------------------------------------------------
# worker (runs in each spawned rank)
# ------------------------------------------------------------------------------------------------
def _load_worker(spec: dict, rank: int, out: Path) -> None:
    from fastkd.data import load

    res = {}
    for name, (path, kwargs) in spec["load_cases"].items():
        try:
            data, enc = load(path, return_encoder=True, sharded=True, **kwargs)
            res[name] = (data.ids, data.labels, data.field_sizes, enc.state_dict())
        except Exception as exc:  # the strict case: every rank must raise, none may hang
            res[name] = f"{type(exc).__name__}: {exc}"
    from fastkd.data import cached_split  # the on-disk cache: rank 0 builds it, every rank maps it
    path, kwargs = spec["load_cases"]["criteo-hash"]
    parts, _, folder = cached_split(path, out / "encoded_cache", kind="hash", num_buckets=kwargs["num_buckets"])
    from fastkd.data.rows import is_file_backed
    res["cached_split"] = ([(np.array(p.ids), np.array(p.labels)) for p in parts], folder.name,
                           sorted(q.name for q in (out / "encoded_cache").iterdir()),
                           all(is_file_backed(p.ids) for p in parts))
    torch.save(res, out / f"load{rank}.pt")


def _worker(spec: dict) -> None:
    torch.set_num_threads(1)
    distributed.init_process_group(timeout_s=spec["timeout_s"])
    rank = distributed.get_rank()
    out = Path(spec["out"])
    if spec.get("load_cases"):
        try:
            _load_worker(spec, rank, out)
        finally:
            distributed.destroy_process_group()
        return
    try:
        train, valid, test = _splits()
        res = {"world": distributed.get_world_size()}
        if spec.get("cache"):
            teachers = _fixed_teachers(train.field_sizes)
            mem = TeacherCache.build(teachers, train, hidden=True)
            TeacherCache.build(teachers, train, hidden=True, path=out / "fixed_cache")
            res["mem_cache"] = (mem.logits, mem.hidden)
        if spec.get("batch_norm_model"):
            bn = _model("dnn", train.field_sizes, 4, batch_norm=True)
            train_model(bn, train, valid, TrainConfig(**{**CFG, "max_epochs": 2, "early_stop": "auc"}))
            res["batch_norm_model"] = {k: v.clone() for k, v in bn.state_dict().items()}
        if spec.get("cotrain"):
            fs = train.field_sizes
            co = Distiller([_model("deepfm", fs, 5), _model("dcn", fs, 6)], _model("dnn", fs, 7), mode="cotrain",
                           gate="hidden", hint_weight=1.0,
                           config=TrainConfig(**{**CFG, "max_epochs": 2, "early_stop": "auc"}))
            co.fit(train, valid)
            mods = {"teachers": co.teachers, "student": co.student, "loss": co.loss, "hints": co.hints}
            res["cotrain"] = {f"{m}.{k}": v.clone() for m, mod in mods.items() for k, v in mod.state_dict().items()}
        if spec.get("augmented"):
            aug = _augmented_distiller(train.field_sizes, out / "aug_cache")
            aug.fit(train, valid)
            res["augmented"] = {"student": {k: v.clone() for k, v in aug.student.state_dict().items()},
                                "test_auc": aug.evaluate(test)["auc"], "rows": aug.summary["augmented_rows"],
                                "files": sorted(p.name for p in (out / "aug_cache").iterdir())}
        if spec.get("row_blocks"):
            res["row_blocks"] = _row_blocks_run(train, valid, test, out / "blocks_cache")
        if spec.get("experiment"):
            res["experiment"] = _experiment_run(train, valid, test)
        kd = _distiller(train.field_sizes, out)
        if spec.get("kill_at") and rank == 1:
            calls = [0]

            def die_mid_epoch(module, args):
                if module.training:
                    calls[0] += 1
                    if calls[0] == spec["kill_at"]:
                        os._exit(17)
            kd.student.register_forward_pre_hook(die_mid_epoch)
        summary = kd.fit(train, valid, checkpoint_dir=out / "ckpt", resume=spec.get("resume", False))
        res["student"] = {k: v.clone() for k, v in kd.student.state_dict().items()}
        res["gate"] = {k: v.clone() for k, v in kd.loss.state_dict().items()}
        res["history"] = summary["student"]["history"]
        res["teacher_epochs"] = [s["epochs"] for s in summary["teachers"]]
        res["test_auc"] = kd.evaluate(test)["auc"]
        # the gathered monitor (each rank scores half of the rows) against this rank scoring all
        res["gathered"] = {m: _label_monitor(kd.student, valid, m, 16384)() for m in ("auc", "logloss")}
        res["full"] = evaluate(kd.student, valid)
        torch.save(res, out / f"rank{rank}.pt")
    finally:
        distributed.destroy_process_group()


def _row_blocks_run(train, valid, test, cache_dir: Path) -> dict:
    """The augmented distillation with ``row_blocks=2``, every student epoch's order recorded as
    the loop receives it (the teachers train with their own config)."""
    real, orders = distributed.block_order, []

    def spy(*args, **kwargs):
        orders.append(real(*args, **kwargs))
        return orders[-1]

    distributed.block_order = spy
    try:
        kd = _augmented_distiller(train.field_sizes, cache_dir, row_blocks=2)
        kd.fit(train, valid)
    finally:
        distributed.block_order = real
    return {"student": {k: v.clone() for k, v in kd.student.state_dict().items()},
            "test_auc": kd.evaluate(test)["auc"], "orders": orders,
            "student_rows": len(train) + len(valid) - int(round(0.5 * len(valid))) + kd.summary["augmented_rows"]}


def _experiment_run(train, valid, test) -> list:
    """A tiny ``run_experiment`` whose stacked gate is never kept (its keep rule set out of
    reach): the gated student must be the mean student reused, on every rank alike."""
    from fastkd import gates
    from fastkd.experiment import ExperimentSpec, run_experiment

    saved = dict(gates.fit_gate.__kwdefaults__)
    gates.fit_gate.__kwdefaults__["min_z"] = 1e9
    try:
        spec = ExperimentSpec(teachers=("dnn", "deepfm"), model_kwargs=SMALL, student_dropout=(0.0, 0.2),
                              seeds=(0,), config=TrainConfig(max_epochs=2, batch_size=256, merge_validation=True))
        res = run_experiment(train, valid, test, spec, log=lambda *a: None)
    finally:
        gates.fit_gate.__kwdefaults__.update(saved)
    keep = ("model", "variant", "auc", "logloss", "epochs", "student_dropout", "student_from")
    return [{k: r.get(k) for k in keep} for r in res.records]


def _launch(out: Path, world: int = 2, **spec):
    """Run ``world`` ranks of :func:`_worker`; returns (return codes, output texts)."""
    out.mkdir(parents=True, exist_ok=True)
    spec = {"out": str(out), "timeout_s": COLLECTIVE_TIMEOUT_S, **spec}
    (out / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(distributed.free_port()),
               WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    procs = []
    for r in range(world):
        log = open(out / f"rank{r}.log", "w")
        procs.append((subprocess.Popen([sys.executable, __file__, str(out / "spec.json")],
                                       env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                       stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    codes = []
    try:
        for p, _ in procs:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    logs = [(out / f"rank{r}.log").read_text() for r in range(world)]
    return codes, logs


def _load(out: Path, rank: int) -> dict:
    return torch.load(out / f"rank{rank}.pt", weights_only=False)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Two launches (process start-up dominates their cost): rank 1 killed in the student's second
    epoch, then the same command with ``resume=True``, which also builds a cache from fixed
    teachers, trains a BatchNorm model and co-trains teachers, hidden gate, hints and student."""
    out = tmp_path_factory.mktemp("ddp")
    # 700 rows per rank in batches of 128: 6 steps an epoch; the 9th is in the student's second epoch
    killed = _launch(out, kill_at=9)
    rank0_saved_results = (out / "rank0.pt").exists()
    state = torch.load(out / "ckpt" / "student.pt", weights_only=False)
    codes, logs = _launch(out, resume=True, cache=True, batch_norm_model=True, cotrain=True, augmented=True,
                          row_blocks=True, experiment=True)
    assert codes == [0, 0], "\n".join(logs)
    return {"out": out, "killed": killed, "rank0_saved_results": rank0_saved_results,
            "checkpoint_after_kill": state, "ranks": [_load(out, 0), _load(out, 1)]}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same run in this process, without a process group."""
    out = tmp_path_factory.mktemp("single")
    train, valid, test = _splits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kd = _distiller(train.field_sizes, out)
        summary = kd.fit(train, valid)
        bn = _model("dnn", train.field_sizes, 4, batch_norm=True)
        train_model(bn, train, valid, TrainConfig(**{**CFG, "max_epochs": 2, "early_stop": "auc"}))
        aug = _augmented_distiller(train.field_sizes, out / "aug_cache")
        aug.fit(train, valid)
        return {"augmented": {"student": aug.student.state_dict(), "test_auc": aug.evaluate(test)["auc"],
                              "rows": aug.summary["augmented_rows"]},
                "row_blocks": _row_blocks_run(train, valid, test, out / "blocks_cache"),
                "student": kd.student.state_dict(), "history": summary["student"]["history"],
                "teacher_epochs": [s["epochs"] for s in summary["teachers"]],
                "test_auc": kd.evaluate(test)["auc"], "batch_norm_model": bn.state_dict()}
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# sharded reading and encoding (fastkd.data.load under a process group)
# ------------------------------------------------------------------------------------------------
def _write_sources(d: Path) -> dict:
    """Small sources in every reader family, with a malformed row, and the load cases over them."""
    rng = np.random.default_rng(0)
    n = 103
    a, b = rng.integers(0, 9, n), rng.integers(0, 30, n)
    num, lab = rng.normal(size=n).round(3), rng.integers(0, 2, n)
    lines = ["label,a,b,n"] + [f"{lab[i]},a{a[i]},b{b[i]},{num[i]}" for i in range(n)]
    lines.insert(61, "1,a1,b2")  # too few fields: skipped, or the strict error
    (d / "t.csv").write_text("\n".join(lines) + "\n")
    criteo = []
    for i in range(n):
        ints = [str(rng.integers(0, 50)) if rng.random() > 0.2 else "" for _ in range(13)]
        cats = [format(int(rng.integers(0, 40 if f < 3 else 5)), "08x") for f in range(26)]
        criteo.append("\t".join([str(lab[i])] + ints + cats))
    (d / "c.txt").write_text("\n".join(criteo) + "\n")
    for k, rows in enumerate((range(0, 50), range(50, n))):
        (d / f"f{k}.libfm").write_text("".join(f"{lab[i]} {a[i]}:1 {9 + b[i]}:1 {40 + i % 7}:1\n" for i in rows))
    # rank 1's only block (lines 10-18 with chunk_rows=9) is all malformed: its field count must
    # still come from the source's first good line
    bad_block = [f"{lab[i]} {a[i]}:1 {9 + b[i]}:1 {40 + i % 7}:1" for i in range(9)]
    bad_block += ["1 x" for _ in range(9)] + [f"{lab[i]} {a[i]}:1 {9 + b[i]}:1 {40 + i % 7}:1" for i in range(4)]
    (d / "bad.libfm").write_text("\n".join(bad_block) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"label": lab, "a": [f"a{v}" for v in a], "b": [f"b{v}" for v in b], "n": num}),
                   d / "t.parquet", row_group_size=10)
    return {
        "csv-vocab": (f"csv:{d}/t.csv", dict(min_count=2, numeric=["n"], chunk_rows=7)),
        "csv-hash": (f"csv:{d}/t.csv", dict(kind="hash", num_buckets=50, chunk_rows=7)),
        "criteo-hash": (f"criteo:{d}/c.txt", dict(kind="hash", num_buckets=[20] * 13 + [64] * 26, chunk_rows=6)),
        "criteo-vocab": (f"criteo:{d}/c.txt", dict(chunk_rows=6)),
        "libfm-two-files": (f"libfm:{d}/f0.libfm,{d}/f1.libfm", dict(chunk_rows=9)),
        "libfm-malformed-block": (f"libfm:{d}/bad.libfm", dict(chunk_rows=9, max_bad_rows=9)),
        "parquet-row-groups": (f"parquet:{d}/t.parquet", dict(numeric=["n"], chunk_rows=4)),
        "strict-error": (f"csv:{d}/t.csv", dict(strict=True, chunk_rows=7)),
    }


@pytest.fixture(scope="module")
def sharded_loads(tmp_path_factory):
    out = tmp_path_factory.mktemp("load")
    cases = _write_sources(out)
    codes, logs = _launch(out, load_cases=cases)
    assert codes == [0, 0], "\n".join(logs)
    return cases, [torch.load(out / f"load{r}.pt", weights_only=False) for r in range(2)]


def test_sharded_reads_partition_the_source_in_order(tmp_path):
    from fastkd.data import iter_table

    cases = _write_sources(tmp_path)
    for name in ("csv-vocab", "criteo-vocab", "libfm-two-files", "parquet-row-groups"):
        path, kw = cases[name]
        kw = {k: v for k, v in kw.items() if k in ("numeric", "chunk_rows")}
        whole = list(iter_table(path, **kw))
        shards = [list(iter_table(path, shard=(r, 3), **kw)) for r in range(3)]
        assert all(shards), f"{name}: a rank got no chunk"
        merged = sorted((t for s in shards for t in s), key=lambda t: t.chunk)
        cat = lambda ts, f: np.concatenate([t.columns[f] for t in ts])  # noqa: E731
        assert np.array_equal(np.concatenate([t.labels for t in merged]), np.concatenate([t.labels for t in whole]))
        for f in range(len(whole[0].field_names)):
            assert list(cat(merged, f)) == list(cat(whole, f)), (name, f)


@pytest.mark.parametrize("bad", [(1,), (2, 2), (-1, 2), "0,2"])
def test_bad_shard_argument_raises(tmp_path, bad):
    from fastkd.data import iter_table

    (tmp_path / "t.csv").write_text("label,a\n1,x\n")
    with pytest.raises(ValueError, match="shard must be"):
        list(iter_table(f"csv:{tmp_path}/t.csv", shard=bad))


def test_load_sharded_true_needs_a_process_group(tmp_path):
    from fastkd.data import load

    (tmp_path / "t.csv").write_text("label,a\n1,x\n")
    with pytest.raises(RuntimeError, match="process group"):
        load(f"csv:{tmp_path}/t.csv", sharded=True)


def test_two_ranks_load_what_one_process_loads(sharded_loads):
    from fastkd.data import load

    cases, ranks = sharded_loads
    for name, (path, kwargs) in cases.items():
        if name == "strict-error":
            continue
        data, enc = load(path, return_encoder=True, **kwargs)
        for r, res in enumerate(ranks):
            assert not isinstance(res[name], str), f"rank {r}, {name}: {res[name]}"
            ids, labels, sizes, state = res[name]
            assert np.array_equal(ids, data.ids), (name, r)
            assert np.array_equal(labels, data.labels), (name, r)
            assert sizes == data.field_sizes and state == enc.state_dict(), (name, r)


def test_encoded_cache_is_built_once_and_mapped_by_every_rank(sharded_loads):
    # mutation caught: every rank building its own cache (a second folder, or a rank reading a
    # folder another rank is still writing), or parts that differ from one process's split
    from fastkd.data import load

    cases, ranks = sharded_loads
    path, kwargs = cases["criteo-hash"]
    want = load(path, kind="hash", num_buckets=kwargs["num_buckets"]).split((0.8, 0.1, 0.1), seed=0)
    for res in ranks:
        parts, folder, listing, mapped = res["cached_split"]
        assert listing == [folder]
        assert mapped  # every rank reads the rows from the shared files, none holds a copy
        for (ids, labels), w in zip(parts, want):
            np.testing.assert_array_equal(ids, w.ids)
            np.testing.assert_array_equal(labels, w.labels)


def test_an_error_on_one_rank_is_raised_on_every_rank(sharded_loads):
    _, ranks = sharded_loads
    # line 62 of t.csv lies in the 9th block of 7 lines (unit 8), which rank 0 reads
    assert ranks[0]["strict-error"].startswith("ValueError: ") and "t.csv:62" in ranks[0]["strict-error"]
    assert ranks[1]["strict-error"].startswith("RuntimeError: sharded load: rank 0 failed")
    assert "t.csv:62" in ranks[1]["strict-error"]


# ------------------------------------------------------------------------------------------------
# pure helpers (no process group)
# ------------------------------------------------------------------------------------------------
_SHARD_PARAMS = [(10, 2), (7, 3), (1, 2), (4, 4)]  # even, odd and uneven, one row, one per rank


@pytest.mark.parametrize("n, world", _SHARD_PARAMS)
def test_shard_permutation_deals_like_distributed_sampler(n, world):
    from torch.utils.data import DistributedSampler

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    mine = [distributed.shard_permutation(perm, r, world).tolist() for r in range(world)]

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return n

    theirs = []
    for r in range(world):
        s = DistributedSampler(Rows(), num_replicas=world, rank=r, shuffle=False)
        theirs.append([perm[i].item() for i in s])
    assert mine == theirs
    assert sorted(set(sum(mine, []))) == list(range(n))  # every row seen, padding repeats only


@pytest.mark.parametrize("n, world", _SHARD_PARAMS)
def test_shard_bounds_cover_rows_in_order(n, world):
    bounds = [distributed.shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert [b - a for a, b in bounds] == [len(x) for x in np.array_split(np.arange(n), world)]


def test_no_process_group_means_single_process_answers():
    assert not distributed.is_initialized()
    assert (distributed.get_rank(), distributed.get_world_size()) == (0, 1)
    x = torch.arange(6.0).reshape(3, 2)
    assert distributed.gather_rows(x, 3) is x
    assert distributed.all_reduce_sum(x) is x
    assert distributed.broadcast_float(0.25) == 0.25


def test_cache_parts_protocol_never_trusts_a_missing_or_half_written_part(tmp_path, monkeypatch):
    """The two ranks' side of a parallel cache build, played in turn in this process."""
    train, _, _ = _splits()
    teachers = _fixed_teachers(train.field_sizes)
    path = tmp_path / "cache"
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed, "barrier", lambda: None)

    class Boom(torch.nn.Module):
        hidden_dim = teachers[1].hidden_dim

        def forward(self, ids, return_hidden=False):
            raise RuntimeError("rank died")

    monkeypatch.setattr(distributed, "get_rank", lambda: 1)
    with pytest.raises(RuntimeError, match="rank died"):
        TeacherCache.build([teachers[0], Boom()], train, hidden=True, path=path)
    assert all(f.name.endswith(".tmp") for f in path.iterdir())  # nothing a reader would open
    # rank 0 completes its part, then finds no marker for rank 1: it writes no metadata
    monkeypatch.setattr(distributed, "get_rank", lambda: 0)
    with pytest.raises(FileNotFoundError):
        TeacherCache.build(teachers, train, hidden=True, path=path)
    with pytest.raises(FileNotFoundError, match="no complete teacher cache"):
        TeacherCache.load(path)
    # the rerun: rank 1 completes (it cannot open the cache before rank 0 writes the metadata)
    monkeypatch.setattr(distributed, "get_rank", lambda: 1)
    with pytest.raises(FileNotFoundError, match="no complete teacher cache"):
        TeacherCache.build(teachers, train, hidden=True, path=path)
    monkeypatch.setattr(distributed, "get_rank", lambda: 0)
    cache = TeacherCache.build(teachers, train, hidden=True, path=path)
    ref = TeacherCache.build(teachers, train, hidden=True, shard=False)
    rows = torch.tensor([0, 699, 700, 1399, 5, 1000])  # both sides of the part boundary
    torch.testing.assert_close(cache.gather(rows)[0], ref.logits[rows], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache.gather(rows)[1], ref.hidden[rows], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache.logits[:], ref.logits, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# two gloo ranks
# ------------------------------------------------------------------------------------------------
def test_ranks_end_with_identical_student_and_gate(two_ranks):
    r0, r1 = two_ranks["ranks"]
    assert r0["world"] == 2
    for key in ("student", "gate"):
        for name in r0[key]:
            torch.testing.assert_close(r0[key][name], r1[key][name], rtol=0, atol=0, msg=name)
    # stopping decided from one broadcast value: every rank ran the same epochs with the same monitor
    assert [h["monitor"] for h in r0["history"]] == [h["monitor"] for h in r1["history"]]
    assert [h["train_loss"] for h in r0["history"]] == [h["train_loss"] for h in r1["history"]]
    assert r0["teacher_epochs"] == r1["teacher_epochs"]


def test_two_ranks_match_one_process(two_ranks, one_process):
    r0, _ = two_ranks["ranks"]
    assert r0["teacher_epochs"] == one_process["teacher_epochs"]
    assert len(r0["history"]) == len(one_process["history"])
    assert r0["test_auc"] == pytest.approx(one_process["test_auc"], abs=AUC_TOL)
    # the monitored distillation loss, summed over ranks, tracks the single-process one
    for h2, h1 in zip(r0["history"], one_process["history"]):
        assert h2["monitor"] == pytest.approx(h1["monitor"], rel=1e-4)
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-4)
    for name, p in one_process["student"].items():
        torch.testing.assert_close(r0["student"][name], p, rtol=1e-4, atol=1e-5, msg=name)


def test_augmented_distillation_from_files_on_two_ranks_matches_one_process(two_ranks, one_process):
    # the default path with cache_dir (what `fastkd distill` runs on memory-mapped rows): each rank
    # writes its own augmented rows and targets beside the shared teacher cache, and the ranks end
    # where one process ends
    r0, r1 = (r["augmented"] for r in two_ranks["ranks"])
    one = one_process["augmented"]
    assert r0["rows"] == r1["rows"] == one["rows"] > 0
    assert {"augmented_ids.rank0.npy", "augmented_ids.rank1.npy", "targets.rank0.npy",
            "targets.rank1.npy"} <= set(r0["files"])
    for name, p in one["student"].items():
        torch.testing.assert_close(r0["student"][name], r1["student"][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(r0["student"][name], p, rtol=1e-4, atol=1e-5, msg=name)
    assert r0["test_auc"] == pytest.approx(one["test_auc"], abs=AUC_TOL)


def test_with_row_blocks_each_rank_reads_only_its_half_and_matches_one_process(two_ranks, one_process):
    # row_blocks=2 (#16): every epoch of the student, rank r's order holds rows
    # of block r alone and covers all of them; one process with row_blocks=2 takes the same steps.
    # Mutation caught: block_order dealing the whole permutation (rows of both halves on a rank)
    one = one_process["row_blocks"]
    ranks = [r["row_blocks"] for r in two_ranks["ranks"]]
    for rank, res in enumerate(ranks):
        assert len(res["orders"]) == len(one["orders"]) == 2  # the student's two epochs
        for order, whole in zip(res["orders"], one["orders"]):
            n = int(whole.max()) + 1
            a, b = distributed.shard_bounds(n, rank, 2)
            assert order.shape[0] == 1 and set(order.flatten().tolist()) == set(range(a, b))
            assert torch.equal(order[0], whole[rank])
    # the student's epochs were over the real and augmented rows, each rank half of them
    assert {int(o.max()) + 1 for o in one["orders"]} == {one["student_rows"]}
    for name, p in one["student"].items():
        torch.testing.assert_close(ranks[0]["student"][name], ranks[1]["student"][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(ranks[0]["student"][name], p, rtol=1e-4, atol=1e-5, msg=name)
    assert ranks[0]["test_auc"] == pytest.approx(one["test_auc"], abs=AUC_TOL)


def test_a_gated_student_is_reused_on_every_rank_or_none(two_ranks):
    # the reuse decision is taken on all ranks' answers; here every rank's targets equal the
    # mean student's, so both reuse it and their records agree. Mutation caught: a rank deciding
    # alone after a collective the other skipped (hangs or differs)
    a, b = (r["experiment"] for r in two_ranks["ranks"])
    assert a == b
    gated = next(r for r in a if r["model"] == "dnn (gate)")
    mean = next(r for r in a if r["model"] == "dnn (mean)")
    assert gated["student_from"] == "dnn (mean)" and gated["auc"] == mean["auc"]


def test_block_order_cuts_rows_like_shard_bounds_and_permutes_each_block():
    # each block a permutation of its shard_bounds rows, padded by its head; rank=r its row alone
    for n, w in [(5, 2), (7, 3), (1, 1), (10, 1)]:
        order = distributed.block_order(n, w, seed=3, epoch=1)
        assert order.shape == (w, -(-n // w))
        for r in range(w):
            a, b = distributed.shard_bounds(n, r, w)
            row = order[r].tolist()
            assert sorted(row[:b - a]) == list(range(a, b)) and row[b - a:] == row[:len(row) - (b - a)]
            assert torch.equal(distributed.block_order(n, w, seed=3, epoch=1, rank=r)[0], order[r])
    assert not torch.equal(distributed.block_order(50, 2, 3, 1), distributed.block_order(50, 2, 3, 2))
    with pytest.raises(ValueError, match="blocks"):
        distributed.block_order(1, 2, 0, 0)


def test_gathered_metrics_equal_whole_data_metrics(two_ranks):
    for r in two_ranks["ranks"]:
        assert r["gathered"]["auc"] == r["full"]["auc"]
        # logloss sums floats: the same logits, up to a GEMM's last bit for a 150-row batch
        assert r["gathered"]["logloss"] == pytest.approx(r["full"]["logloss"], rel=1e-6)


def test_cache_built_by_two_ranks_equals_one_process(two_ranks):
    out, (r0, r1) = two_ranks["out"], two_ranks["ranks"]
    train, _, _ = _splits()
    ref = TeacherCache.build(_fixed_teachers(train.field_sizes), train, hidden=True)
    disk = TeacherCache.load(out / "fixed_cache")
    meta = json.loads((out / "fixed_cache" / TeacherCache.META).read_text())
    assert [(p["start"], p["stop"]) for p in meta["parts"]] == [(0, 700), (700, 1400)]
    assert not list((out / "fixed_cache").glob("*.tmp"))
    rows = torch.randperm(len(train))
    # the teachers see different eval batch sizes (700 against 1400 rows), which can change the
    # last bit of a GEMM; any larger difference would be a wrong row or a wrong teacher
    tol = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(disk.gather(rows)[0], ref.logits[rows], **tol)
    torch.testing.assert_close(disk.gather(rows)[1], ref.hidden[rows], **tol)
    assert disk.logits.shape == ref.logits.shape and disk.hidden.shape == ref.hidden.shape
    for r in (r0, r1):
        torch.testing.assert_close(r["mem_cache"][0], ref.logits, **tol)
        torch.testing.assert_close(r["mem_cache"][1], ref.hidden, **tol)


def test_rank_killed_mid_epoch_then_resume_completes(two_ranks):
    codes, logs = two_ranks["killed"]
    assert codes[1] == 17, logs[1]
    assert codes[0] != 0, "rank 0 must notice its peer died, not hang or finish alone"
    assert not two_ranks["rank0_saved_results"]
    state = two_ranks["checkpoint_after_kill"]
    assert state["epoch"] == 1  # only the completed epoch was checkpointed (by rank 0)
    r0, _ = two_ranks["ranks"]
    assert [h["epoch"] for h in r0["history"]] == list(range(1, len(r0["history"]) + 1))
    assert len(r0["history"]) >= 2 and r0["history"][0] == state["history"][0]
    # the resumed run's outcome is checked against one process in test_two_ranks_match_one_process


def test_cotrain_teachers_gate_hints_and_student_agree_across_ranks(two_ranks):
    r0, r1 = two_ranks["ranks"]
    assert any(k.startswith("teachers.") for k in r0["cotrain"]) and "loss.weight" in r0["cotrain"]
    for name, v in r0["cotrain"].items():
        torch.testing.assert_close(v, r1["cotrain"][name], rtol=0, atol=0, msg=name)


def test_batch_norm_running_statistics_agree_across_ranks(two_ranks):
    r0, r1 = two_ranks["ranks"]
    assert any("running_mean" in k for k in r0["batch_norm_model"])
    for name, v in r0["batch_norm_model"].items():
        torch.testing.assert_close(v, r1["batch_norm_model"][name], rtol=0, atol=0, msg=name)


def test_batch_norm_under_ddp_uses_global_batch_statistics(two_ranks, one_process):
    # CPU "sync BatchNorm": with dropout 0 the 2-rank BatchNorm model takes the single-process
    # steps (batch statistics of the whole global batch), to float summation order
    r0 = two_ranks["ranks"][0]["batch_norm_model"]
    for name, v in one_process["batch_norm_model"].items():
        if name.endswith("num_batches_tracked"):
            assert int(v) == int(r0[name]), name
            continue
        torch.testing.assert_close(r0[name], v, rtol=1e-4, atol=1e-5, msg=name)


def test_sync_batch_norm_math_equals_batch_norm_on_one_rank(tmp_path):
    # With one rank the all-reduces are identities: forward, input/weight/bias gradients and the
    # running statistics must be BatchNorm1d's own.
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        bn = torch.nn.BatchNorm1d(5, momentum=0.3)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
        ref = torch.nn.BatchNorm1d(5, momentum=0.3)
        ref.load_state_dict(bn.state_dict())
        x = (torch.randn(37, 5) * 3 + 1).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        up = torch.randn(37, 5)
        y = distributed._sync_bn_forward(bn, x)
        y_ref = ref(x_ref)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        got = torch.autograd.grad(y, (x, bn.weight, bn.bias), up)
        want = torch.autograd.grad(y_ref, (x_ref, ref.weight, ref.bias), up)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
        for name, v in ref.state_dict().items():
            torch.testing.assert_close(bn.state_dict()[name], v, rtol=1e-5, atol=1e-6, msg=name)
        with distributed.sync_batch_norm([bn]):  # a group of one: nothing is patched
            assert "forward" not in bn.__dict__
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(json.loads(Path(sys.argv[1]).read_text()))
