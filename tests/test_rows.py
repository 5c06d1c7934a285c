"""fastkd.data.rows: row blocks read as one array (the memory-mapped training sets of issue 16)."""
import numpy as np
import pytest
import torch

from fastkd.augment import swap_augment
from fastkd.data import CTRData
from fastkd.data.rows import Rows, TensorRows, as_tensor_rows, is_file_backed

# (block lengths): one block, an empty block in the middle, a single row, an odd split
SHAPES = {"one": (40,), "with_empty": (50, 0, 33), "single_row": (1, 1), "odd": (7, 13, 5)}


@pytest.fixture(params=list(SHAPES), ids=list(SHAPES))
def blocks(request):
    rng = np.random.default_rng(len(request.param))
    return [rng.integers(0, 100, (n, 4)) for n in SHAPES[request.param]]


def test_gathers_equal_the_concatenation(blocks):
    # mutation caught: an index mapped into the wrong block (bounds off by one), negative
    # indices not wrapped, a slice across blocks dropping its last block
    r, full = Rows(blocks), np.concatenate(blocks)
    rng = np.random.default_rng(0)
    n = len(full)
    idx = rng.integers(-n, n, 300)
    np.testing.assert_array_equal(r[idx], full[idx])
    cols = rng.integers(0, 4, 300)
    np.testing.assert_array_equal(r[idx, cols], full[idx, cols])
    for a, b in ((0, n), (1, n - 1), (n // 2, n), (0, 1)):
        np.testing.assert_array_equal(r[a:b], full[a:b])
    np.testing.assert_array_equal(r[::3], full[::3])
    np.testing.assert_array_equal(np.asarray(r), full)
    assert r.shape == full.shape and len(r) == n
    t = TensorRows(r)
    assert torch.equal(t[torch.tensor([0, n - 1])], torch.from_numpy(full[[0, n - 1]]))
    assert torch.equal(t[0:n], torch.from_numpy(full))


def test_bad_keys_and_parts_raise():
    r = Rows([np.zeros((3, 2), np.int64), np.ones((2, 2), np.int64)])
    with pytest.raises(IndexError):
        r[np.array([5])]
    with pytest.raises(TypeError, match="boolean"):
        r[np.ones(5, dtype=bool)]
    with pytest.raises(ValueError, match="trailing shape"):
        Rows([np.zeros((3, 2)), np.zeros((3, 3))])
    with pytest.raises(ValueError, match="at least one"):
        Rows([])


def test_swap_augment_reads_rows_in_place(blocks):
    # mutation caught: swap_augment materialising or reordering the blocks (other rows drawn)
    full = np.concatenate(blocks)
    np.testing.assert_array_equal(swap_augment(Rows(blocks), 1.5, 0.3, seed=2), swap_augment(full, 1.5, 0.3, seed=2))


def test_concat_of_memory_mapped_parts_is_a_view(tmp_path):
    # mutation caught: concat copying memory-mapped parts (the rows would land in RAM)
    ids = np.lib.format.open_memmap(tmp_path / "ids.npy", mode="w+", dtype=np.int64, shape=(10, 2))
    ids[:] = np.arange(20).reshape(10, 2) % 5
    labels = np.lib.format.open_memmap(tmp_path / "labels.npy", mode="w+", dtype=np.float32, shape=(10,))
    labels[:] = np.arange(10) % 2
    ids.flush(), labels.flush()
    ids, labels = np.load(tmp_path / "ids.npy", mmap_mode="c"), np.load(tmp_path / "labels.npy", mmap_mode="c")
    a = CTRData(ids[:6], labels[:6], ["a", "b"], [5, 5])
    b = CTRData(ids[7:], labels[7:], ["a", "b"], [5, 5])
    assert is_file_backed(a.ids) and not is_file_backed(np.zeros(3))
    both = CTRData.concat([a, b])
    assert isinstance(both.ids, Rows) and len(both) == 9
    np.testing.assert_array_equal(np.asarray(both.ids), np.concatenate([ids[:6], ids[7:]]))
    assert both.positive_rate == pytest.approx(float(np.concatenate([labels[:6], labels[7:]]).mean()))
    assert isinstance(as_tensor_rows(both.ids), TensorRows)
    mem = CTRData.concat([CTRData(np.asarray(ids[:6]).copy(), np.asarray(labels[:6]).copy(), ["a", "b"], [5, 5]), b])
    assert isinstance(mem.ids, Rows)  # one file-backed part is enough
    plain = CTRData.concat([CTRData(np.zeros((2, 2), np.int64), np.zeros(2, np.float32), ["a", "b"], [5, 5])] * 2)
    assert isinstance(plain.ids, np.ndarray)


def test_subset_of_a_memory_mapped_run_is_a_view(tmp_path):
    # mutation caught: the monitor/merged split of cached data copied into memory
    ids = np.lib.format.open_memmap(tmp_path / "ids.npy", mode="w+", dtype=np.int64, shape=(10, 2))
    ids[:] = 1
    labels = np.lib.format.open_memmap(tmp_path / "labels.npy", mode="w+", dtype=np.float32, shape=(10,))
    ids.flush(), labels.flush()
    d = CTRData(np.load(tmp_path / "ids.npy", mmap_mode="c"), np.load(tmp_path / "labels.npy", mmap_mode="c"),
                ["a", "b"], [2, 2])
    run = d.subset(np.arange(3, 8))
    assert is_file_backed(run.ids) and len(run) == 5
    assert not is_file_backed(d.subset(np.array([3, 5, 4])).ids)  # not a run: a copy, as before
    np.testing.assert_array_equal(run.ids, d.ids[3:8])


@pytest.mark.parametrize("gate", ["mean", "features"])
def test_distiller_on_mapped_rows_keeps_augmented_rows_and_teacher_outputs_on_disk(tmp_path, gate):
    # mutation caught: augmented rows or teacher logits built in memory despite cache_dir (not file
    # backed), or the on-disk path giving other soft labels or another student than the in-memory one
    from helpers import quick_config, small_model
    from fastkd import Distiller
    from fastkd.data import make_synthetic
    from fastkd.train.teachers import train_teachers

    data = make_synthetic(1500, seed=3)
    np.save(tmp_path / "ids.npy", data.ids), np.save(tmp_path / "labels.npy", data.labels)
    mapped = CTRData(np.load(tmp_path / "ids.npy", mmap_mode="c"), np.load(tmp_path / "labels.npy", mmap_mode="c"),
                     data.field_names, data.field_sizes)
    cfg = quick_config(max_epochs=2, merge_validation=True)
    fs = data.field_sizes
    ts = train_teachers([small_model("dnn", fs, 1), small_model("deepfm", fs, 2)],
                        data.subset(np.arange(1200)), data.subset(np.arange(1200, 1500)), cfg.for_teachers())
    students = {}
    for name, d, cache in (("memory", data, None), ("disk", mapped, tmp_path / "cache")):
        kd = Distiller(ts, small_model("dnn", fs, 5), gate=gate, augment=1.0, teachers_trained=True, config=cfg,
                       cache_dir=cache)
        kd.fit(d.subset(np.arange(1200)), d.subset(np.arange(1200, 1500)))
        students[name] = kd
    aug = np.load(tmp_path / "cache" / "augmented_ids.rank0.npy", mmap_mode="r")
    assert aug.shape == (1200 + 150, data.ids.shape[1])  # one per student row (train + merged half of valid)
    disk, mem = students["disk"], students["memory"]
    assert is_file_backed(disk.cache.logits.arr) and isinstance(mem.cache.logits, torch.Tensor)
    targets = np.load(tmp_path / "cache" / "targets.rank0.npy", mmap_mode="r")
    torch.testing.assert_close(disk.targets, mem.targets, rtol=0, atol=0)
    np.testing.assert_array_equal(targets, mem.targets.numpy())
    torch.testing.assert_close(disk.predict(data), mem.predict(data), rtol=0, atol=0)
