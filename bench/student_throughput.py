"""Student (DNN) training throughput: fastkd vs DeepCTR-Torch, same architecture, same batch, one run.

DNN: embedding 16 per field, MLP 400-400-400 with batch norm and dropout 0.1, Adam 1e-3,
batch 2048, one logit. DeepCTR-Torch has no bare DNN model; its DeepFM with ``use_fm=False`` and
no linear feature columns is exactly that network. Epochs alternate between the libraries and the
median epoch time of each is reported, with the ratio. Needs ``pip install deepctr-torch``.

``--embedding`` picks fastkd's embedding backward (the MLP always trains with Adam): ``dense``
(the default: dense gradient, Adam), ``sparse`` (merged sparse gradient, SparseAdam) or ``fused``
(Adagrad applied inside backward, lr 0.05, no table gradient at all).

    python bench/student_throughput.py [--epochs 3] [--threads 2] [--embedding dense|sparse|fused|all]
"""
import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from fastkd import TrainConfig
from fastkd.data import load, make_synthetic
from fastkd.models import build_model
from fastkd.train import train_model

FRAPPE = Path(__file__).resolve().parents[2] / "shared" / "data" / "frappe"
EMBEDDING = {"dense": {}, "sparse": {"sparse": True},
             "fused": {"fused_optimizer": "adagrad", "lr": 0.05}}


def deepctr_model(fs):
    from deepctr_torch.inputs import SparseFeat
    from deepctr_torch.models import DeepFM

    cols = [SparseFeat(f"f{i}", vocabulary_size=s, embedding_dim=16) for i, s in enumerate(fs)]
    model = DeepFM([], cols, use_fm=False, dnn_hidden_units=(400, 400, 400), dnn_dropout=0.1,
                   dnn_use_bn=True, l2_reg_embedding=0.0, l2_reg_linear=0.0, device="cpu")
    model.compile(torch.optim.Adam(model.parameters(), lr=1e-3), "binary_crossentropy")
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="fastkd's TrainConfig.precision (DeepCTR-Torch always trains in fp32)")
    ap.add_argument("--embedding", choices=tuple(EMBEDDING) + ("all",), default="dense",
                    help="'all' trains one fastkd student per embedding mode, epochs interleaved")
    args = ap.parse_args()
    from fastkd.allocator import tune_cpu_allocator

    tune_cpu_allocator()  # as the fastkd CLI does; process-wide, so DeepCTR-Torch gets it too
    torch.set_num_threads(args.threads)
    if FRAPPE.exists():
        data = load(f"libfm:{FRAPPE / 'frappe.validation.libfm.gz'},{FRAPPE / 'frappe.test.libfm.gz'}")
        name = "Frappe"
    else:
        data, name = make_synthetic(86_582, n_fields=10, seed=0), "synthetic"
    train, valid, _ = data.split((0.8, 0.1, 0.1), seed=0)
    fs = train.field_sizes
    n = len(train)
    x = {f"f{i}": train.ids[:, i] for i in range(len(fs))}
    dc = deepctr_model(fs)
    modes = list(EMBEDDING) if args.embedding == "all" else [args.embedding]
    fks = {}
    for m in modes:
        torch.manual_seed(0)
        fks[m] = build_model("dnn", fs, dropout=0.1, embedding_options=EMBEDDING[m])
    cfg = TrainConfig(max_epochs=1, patience=2, reduce_lr_on_plateau=False, progress=False,
                      precision=args.precision)
    t_dc, t_fk = [], {m: [] for m in modes}
    for e in range(args.epochs + 1):  # epoch 0 of each warms up and is not counted
        t0 = time.perf_counter()
        dc.fit(x, train.labels.astype(np.float32), batch_size=2048, epochs=1, verbose=0)
        t1 = time.perf_counter()
        for m, fk in fks.items():
            s = train_model(fk, train, valid, cfg)
            if e:
                t_fk[m].append(s["history"][0]["train_seconds"])
        if e:
            t_dc.append(t1 - t0)
    d = statistics.median(t_dc)
    print(f"{name}: {n:,} training rows, batch 2048, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"DeepCTR-Torch DNN  {n / d:10,.0f} samples/s  (median of {len(t_dc)} epochs)")
    for m in modes:
        f = statistics.median(t_fk[m])
        print(f"fastkd DNN ({args.precision}, {m} embedding)  {n / f:10,.0f} samples/s  "
              f"(median of {len(t_fk[m])} epochs); ratio fastkd / DeepCTR-Torch: {d / f:.2f}x")

if __name__ == "__main__":
    main()
