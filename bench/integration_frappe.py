"""Distillation through other trainers' own ``fit``: DeepCTR-Torch and FuxiCTR students vs fastkd's.

Per seed, on the CLI's Frappe split (``fastkd.data.load`` of the two libFM files, rows permuted by
``numpy.random.default_rng(0)``, 80/10/10) and with ``fastkd distill``'s settings (batch 2048,
Adam 1e-3, DNN 400-400-400 with batch norm and dropout 0.3, embeddings of 16, merged validation:
students train on the training split plus half of the validation split and stop on the AUC of the
other half):

1. the teachers (DeepFM, DCN, xDeepFM) as ``fastkd distill`` trains them (same seeds);
2. fastkd's student as ``fastkd distill --gate logit --gate-fit joint --augment 0 --student-dropout 0.3``
   trains it: the paper's gate trained jointly, the loss the adapters use (no feature gate, no
   augmented rows), one fixed dropout (the CLI's default now chooses 0.1 or 0.3 per model on the
   monitor rows; the other trainers' students get 0.3 too);
3. the teachers' logits on the students' training rows (a ``TeacherCache``), given to
4. a DeepCTR-Torch 0.3.0 student (``DeepFM`` without FM and linear part = the same DNN) trained by
   its own ``fit``, early-stopped by its own ``EarlyStopping(val_auc, patience=2,
   restore_best_weights=True)`` on the monitor rows, and
5. a FuxiCTR 2.3.10 student (the model-zoo ``DNN``) trained by its own ``fit`` (its own early
   stopping on AUC, patience 2, learning-rate decay on plateau, best-model checkpoint),

both with ``GatedDistillLoss(3, gate="logit", student_outputs="prob")`` through
``fastkd.integration``; every student is scored on the test split with ``fastkd.metrics``.
``--plain`` adds each trainer's own student without distillation (the plain DeepCTR-Torch student
gets a callback putting it back in training mode each epoch, as ``attach`` does for distilled
ones); ``--deepctr-variants`` adds DeepCTR-Torch students with fastkd's learning-rate decay
callback, and left in eval mode after DeepCTR's first validation pass (its own behaviour);
``--deepctr-xavier`` adds DeepCTR-Torch students initialised as fastkd's and FuxiCTR's DNN.

    python bench/integration_frappe.py --seeds 0 --threads 1 --out runs/integration-frappe.json
    python bench/integration_frappe.py --quick    # a synthetic smoke run of every step (~1 min)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

FRAPPE = Path(__file__).resolve().parents[2] / "shared" / "data" / "frappe"
FRAPPE_SPEC = f"libfm:{FRAPPE / 'frappe.validation.libfm.gz'},{FRAPPE / 'frappe.test.libfm.gz'}"


def cli_settings(quick: bool):
    """The settings ``fastkd distill`` would use, from its own parser and spec builder."""
    from fastkd.cli import _spec, build_parser

    # one fixed student dropout (the teachers' 0.3) for every trainer: the CLI's default chooses
    # between candidates on the monitor rows, which the other trainers' fits do not do
    argv = ["distill", "--data", FRAPPE_SPEC, "--out", "unused", "--gate", "logit", "--gate-fit", "joint",
            "--augment", "0", "--student-dropout", "0.3"]
    if quick:
        argv += ["--hidden-units", "64,64", "--max-epochs", "3", "--teachers", "deepfm,dcn"]
    args = build_parser().parse_args(argv)
    return args, _spec(args)


def load_split(args, quick: bool):
    from fastkd.data import load, make_synthetic

    if quick:
        data = make_synthetic(20_000, n_fields=6, seed=0)
    else:  # as cmd_distill: vocabulary encoder, min_count 1, default malformed-row checks
        data = load(args.data, kind=args.encoder, min_count=args.min_count, label=args.label)
    return data.split((0.8, 0.1, 0.1), seed=args.split_seed)


# ---------------------------------------------------------------------------------------- DeepCTR
def deepctr_student(field_sizes, mk, seed: int, xavier: bool = False):
    """DeepCTR-Torch's DNN; ``xavier``: its linear layers start as fastkd's and FuxiCTR's do
    (Xavier-normal weights, zero biases) instead of DeepCTR's ``N(0, init_std=1e-4)`` hidden weights."""
    from deepctr_torch.inputs import SparseFeat
    from deepctr_torch.models import DeepFM

    cols = [SparseFeat(f"f{i}", vocabulary_size=int(s), embedding_dim=mk["embed_dim"])
            for i, s in enumerate(field_sizes)]
    model = DeepFM([], cols, use_fm=False, dnn_hidden_units=tuple(mk["hidden_units"]), dnn_dropout=mk["dropout"],
                   dnn_use_bn=True, l2_reg_embedding=0.0, l2_reg_linear=0.0, seed=seed, device="cpu")
    if xavier:  # the user's glue: a loop over DeepCTR's linear layers
        for lin in [*model.dnn.linears, model.dnn_linear]:
            torch.nn.init.xavier_normal_(lin.weight)
            if lin.bias is not None:
                torch.nn.init.zeros_(lin.bias)
    return model


def run_deepctr(rows, monitor, test, teacher_logits, mk, cfg, seed: int, kd: bool, train_mode: bool = True,
                lr_decay: bool = False, xavier: bool = False):
    from deepctr_torch.callbacks import Callback, EarlyStopping

    from fastkd import GatedDistillLoss
    from fastkd.integration import deepctr as kd_deepctr

    def x(d):
        return {f"f{i}": d.ids[:, i] for i in range(d.ids.shape[1])}

    class TrainMode(Callback):  # the plain student's fix: DeepCTR-Torch 0.3.0 trains in eval mode
        def on_epoch_begin(self, epoch, logs=None):  # after its first validation (attach() does this
            self.model.train()                        # for distilled students)

    torch.manual_seed(seed)
    student = deepctr_student(rows.field_sizes, mk, seed, xavier)
    student.compile("adam", "binary_crossentropy", metrics=["auc"])  # Adam, lr 1e-3
    inputs = x(rows)
    if kd:  # the glue: two lines
        crit = GatedDistillLoss(teacher_logits.num_teachers, gate="logit", student_outputs="prob")
        inputs = kd_deepctr.attach(student, teacher_logits, crit, train_mode=train_mode).inputs(inputs)
    stop = EarlyStopping("val_auc", patience=cfg.patience, mode="max", restore_best_weights=True)
    callbacks = [stop] + ([TrainMode()] if train_mode and not kd else [])
    if lr_decay:  # fastkd's own rule: learning rate / 10 after each epoch without improvement
        callbacks.append(kd_deepctr.lr_decay_on_plateau("val_auc"))
    t0 = time.perf_counter()
    hist = student.fit(inputs, rows.labels, batch_size=cfg.batch_size, epochs=cfg.max_epochs, verbose=0,
                       validation_data=(x(monitor), monitor.labels), callbacks=callbacks)
    secs = time.perf_counter() - t0
    p = student.predict(x(test), cfg.eval_batch_size).reshape(-1)
    return _scores(test.labels, p), {"epochs": len(hist.epoch), "seconds": round(secs, 1),
                                     "gate_weight": _gate(student)}


# ---------------------------------------------------------------------------------------- FuxiCTR
def fuxictr_dnn_class():
    from fuxictr.pytorch.layers import FeatureEmbedding, MLP_Block
    from fuxictr.pytorch.models import BaseModel

    class DNN(BaseModel):  # FuxiCTR's model_zoo/DNN (Apache-2.0), the model a FuxiCTR user runs
        def __init__(self, feature_map, model_id="DNN", gpu=-1, learning_rate=1e-3, embedding_dim=10,
                     hidden_units=(64, 64, 64), hidden_activations="ReLU", net_dropout=0, batch_norm=False,
                     embedding_regularizer=None, net_regularizer=None, **kwargs):
            super().__init__(feature_map, model_id=model_id, gpu=gpu, embedding_regularizer=embedding_regularizer,
                             net_regularizer=net_regularizer, **kwargs)
            self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
            self.mlp = MLP_Block(input_dim=feature_map.sum_emb_out_dim(), output_dim=1,
                                 hidden_units=list(hidden_units), hidden_activations=hidden_activations,
                                 output_activation=self.output_activation, dropout_rates=net_dropout,
                                 batch_norm=batch_norm)
            self.compile(kwargs["optimizer"], kwargs["loss"], learning_rate)
            self.reset_parameters()
            self.model_to_device()

        def forward(self, inputs):
            X = self.get_inputs(inputs)
            return {"y_pred": self.mlp(self.embedding_layer(X).flatten(start_dim=1))}

    return DNN


def fuxictr_data(rows, monitor, test, root: str, embed_dim: int, batch_size: int):
    """A FuxiCTR feature map (one categorical feature per field) and npz loaders of the splits."""
    from fuxictr.features import FeatureMap
    from fuxictr.pytorch.dataloaders import RankDataLoader

    fm = FeatureMap("frappe", root)
    os.makedirs(os.path.join(root, "frappe"), exist_ok=True)
    for i, s in enumerate(rows.field_sizes):
        fm.features[f"f{i}"] = {"type": "categorical", "vocab_size": int(s), "source": ""}
    fm.labels, fm.default_emb_dim = ["label"], embed_dim
    fm.set_column_index()
    paths = []
    for name, d in (("train", rows), ("valid", monitor), ("test", test)):
        paths.append(os.path.join(root, f"{name}.npz"))
        np.savez(paths[-1], **{f"f{i}": d.ids[:, i] for i in range(d.ids.shape[1])}, label=d.labels.astype(np.float32))
    gens = RankDataLoader(fm, stage="both", train_data=paths[0], valid_data=paths[1], test_data=paths[2],
                          batch_size=batch_size, shuffle=True, num_workers=0)
    return fm, gens


def run_fuxictr(rows, monitor, test, teacher_logits, mk, cfg, seed: int, kd: bool):
    from fuxictr.pytorch.torch_utils import seed_everything

    from fastkd import GatedDistillLoss
    from fastkd.integration import fuxictr as kd_fuxictr

    with tempfile.TemporaryDirectory() as root:
        fm, (train_gen, valid_gen, test_gen) = fuxictr_data(rows, monitor, test, root, mk["embed_dim"], cfg.batch_size)
        seed_everything(seed)
        student = fuxictr_dnn_class()(fm, model_id=f"student{seed}", embedding_dim=mk["embed_dim"],
                                      hidden_units=mk["hidden_units"], net_dropout=mk["dropout"], batch_norm=True,
                                      learning_rate=cfg.lr, optimizer="adam", loss="binary_crossentropy", verbose=0,
                                      model_root=root, metrics=["AUC", "logloss"], monitor="AUC",
                                      early_stop_patience=cfg.patience)
        if kd:  # the glue: two lines
            crit = GatedDistillLoss(teacher_logits.num_teachers, gate="logit", student_outputs="prob")
            train_gen = kd_fuxictr.attach(student, teacher_logits, crit).loader(train_gen)
        t0 = time.perf_counter()
        student.fit(train_gen, epochs=cfg.max_epochs, validation_data=valid_gen)
        secs = time.perf_counter() - t0
        p = student.predict(test_gen)
        return _scores(test.labels, p), {"epochs": student._epoch_index + 1, "seconds": round(secs, 1),
                                         "gate_weight": _gate(student)}


# ---------------------------------------------------------------------------------------- common
def _scores(labels, p) -> dict:
    from fastkd.metrics import log_loss, roc_auc

    p = np.asarray(p, dtype=np.float64).reshape(-1)
    return {"auc": roc_auc(labels, p), "logloss": log_loss(labels, np.clip(p, 1e-7, 1 - 1e-7))}


def _gate(model):
    crit = getattr(model, "fastkd_loss", None)
    return None if crit is None else [round(float(v), 4) for v in crit.weight.detach()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (CLI seed s = its s-th seed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trainers", default="fastkd,deepctr,fuxictr")
    ap.add_argument("--plain", action="store_true", help="also each trainer's student without distillation")
    ap.add_argument("--deepctr-variants", action="store_true",
                    help="also DeepCTR-Torch students with fastkd's learning-rate decay callback, and left in "
                         "DeepCTR's eval mode after the first validation pass (attach(train_mode=False))")
    ap.add_argument("--deepctr-xavier", action="store_true",
                    help="also DeepCTR-Torch students whose linear layers start as fastkd's and FuxiCTR's "
                         "(Xavier-normal) instead of DeepCTR's N(0, 1e-4)")
    ap.add_argument("--quick", action="store_true", help="synthetic data, small models: a smoke run")
    ap.add_argument("--out", default=None, help="JSON file for the records")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    logging.disable(logging.INFO)  # FuxiCTR logs every evaluation at INFO
    from fastkd.allocator import tune_cpu_allocator
    from fastkd.models import build_model
    from fastkd.train import Distiller, TeacherCache, predict, scores
    from fastkd.train.teachers import teacher_seed, train_teachers

    tune_cpu_allocator()  # as the CLI does; process-wide, so every trainer gets it
    args, spec = cli_settings(a.quick)
    train, valid, test = load_split(args, a.quick)
    cfg, mk = spec.config, dict(spec.model_kwargs)
    rows, monitor = cfg.split_validation(train, valid)
    trainers = a.trainers.split(",")
    print(f"train {len(train):,} / valid {len(valid):,} / test {len(test):,}; students train on {len(rows):,} rows, "
          f"stop on {len(monitor):,}; {mk}, batch {cfg.batch_size}, lr {cfg.lr}, patience {cfg.patience}, "
          f"threads {torch.get_num_threads()}", flush=True)
    records = []

    def add(trainer, seed, sc, **extra):
        rec = {"trainer": trainer, "seed": seed, **{k: round(v, 5) for k, v in sc.items()}, **extra}
        records.append(rec)
        print(json.dumps(rec), flush=True)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(records, indent=1))

    for seed in [int(s) for s in a.seeds.split(",")]:
        t0 = time.perf_counter()
        models = []
        for i, name in enumerate(spec.teachers):
            torch.manual_seed(teacher_seed(seed, i))
            models.append(build_model(name, train.field_sizes, **mk))
        ts = train_teachers(models, train, valid, cfg.for_teachers(), seed=seed, names=spec.teachers)
        for name, m in zip(spec.teachers, ts.models):
            add(f"teacher {name}", seed, scores(test.labels, predict(m, test)))
        ens = torch.stack([predict(m, test) for m in ts.models], 1).mean(1)
        add("ensemble (mean)", seed, scores(test.labels, ens), seconds=round(time.perf_counter() - t0, 1))
        if "fastkd" in trainers:
            torch.manual_seed(seed * 100)
            kd = Distiller(ts, build_model(spec.student, train.field_sizes, **mk), mode="pretrain", gate="logit",
                           gate_fit="joint", ensemble=spec.ensemble, temperature=spec.temperature,
                           hard_weight=spec.hard_weight, kd_weight=spec.kd_weight, teachers_trained=True,
                           augment=0.0, config=dataclasses.replace(cfg, seed=seed))
            t1 = time.perf_counter()
            summ = kd.fit(train, valid)
            add("fastkd CLI student (gate logit/joint, augment 0)", seed, scores(test.labels, kd.predict(test)),
                epochs=summ.get("student", summ)["epochs"],
                seconds=round(time.perf_counter() - t1, 1))
        cache = TeacherCache.build(ts.models, rows)  # the teachers' logits on the students' rows, once
        for kd_on in ([True, False] if a.plain else [True]):
            tag = "GatedDistillLoss" if kd_on else "plain, no distillation"
            if "deepctr" in trainers:
                sc, ex = run_deepctr(rows, monitor, test, cache, mk, cfg, seed * 100, kd_on)
                add(f"DeepCTR-Torch fit ({tag})", seed, sc, **ex)
                if a.deepctr_variants:
                    sc, ex = run_deepctr(rows, monitor, test, cache, mk, cfg, seed * 100, kd_on, lr_decay=True)
                    add(f"DeepCTR-Torch fit + lr_decay_on_plateau ({tag})", seed, sc, **ex)
                    sc, ex = run_deepctr(rows, monitor, test, cache, mk, cfg, seed * 100, kd_on, train_mode=False)
                    add(f"DeepCTR-Torch fit, eval-mode epochs ({tag})", seed, sc, **ex)
                if a.deepctr_xavier:
                    sc, ex = run_deepctr(rows, monitor, test, cache, mk, cfg, seed * 100, kd_on, xavier=True)
                    add(f"DeepCTR-Torch fit, Xavier-normal init ({tag})", seed, sc, **ex)
            if "fuxictr" in trainers:
                sc, ex = run_fuxictr(rows, monitor, test, cache, mk, cfg, seed * 100, kd_on)
                add(f"FuxiCTR fit ({tag})", seed, sc, **ex)
    print()
    print("| trainer | seed | test AUC | test logloss | epochs | seconds |")
    print("|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['trainer']} | {r['seed']} | {r['auc']:.4f} | {r['logloss']:.4f} | {r.get('epochs', '')} | "
              f"{r.get('seconds', '')} |")


if __name__ == "__main__":
    main()
