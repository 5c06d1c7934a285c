"""The plain DNN under fastkd's training recipe and under FuxiCTR's, on a dataset's dev split.

FuxiCTR's trainer clips every gradient to a total norm of 10 and starts every Linear layer,
the output layer included, Xavier-normal; fastkd clips nothing and leaves the output layer at
``nn.Linear``'s own initialisation. This trains the plain DNN (embeddings 16, 400-400-400,
dropout 0.3, merged validation, fastkd's stopping rule) both ways per seed, on the ``--dev``
split of ``fastkd distill`` (the test split is never read), and prints each fit and the per-seed
differences. It measures the plain DNN only; the students' side is an ablation row of the suite
(``ABLATIONS="student_head_init=xavier+grad_clip_norm=10"``).

Usage (one line per fit, JSON; a summary line per variant at the end)::

    python bench/accuracy/plain_recipe.py --batch-size 2048 --data libfm:../shared/data/frappe/frappe.validation.libfm.gz,../shared/data/frappe/frappe.test.libfm.gz
    python bench/accuracy/plain_recipe.py --data synthetic:100000 --seeds 0,1,2,3,4
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from fastkd.cli import _dev_split, auto_batch_size
from fastkd.data import load
from fastkd.models import build_model
from fastkd.train import TrainConfig, predict, scores, train_model

RECIPES = {"fastkd": {"grad_clip_norm": None, "head_init": "torch"},
           "fuxictr": {"grad_clip_norm": 10.0, "head_init": "xavier"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="KIND:PATH[,...] as fastkd distill --data, or synthetic:N / segmented:N")
    ap.add_argument("--label", default=None)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=None, help="default: as fastkd distill chooses (auto)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = load(a.data, label=a.label)  # files, or synthetic:N / segmented:N generated as fastkd distill does
    (train, valid, dev), _ = _dev_split(*data.split((0.8, 0.1, 0.1), seed=0), 0)
    base = TrainConfig(batch_size=a.batch_size or auto_batch_size(len(train)), merge_validation=True, progress=False)
    auc = {name: {} for name in RECIPES}
    for seed in [int(s) for s in a.seeds.split(",")]:
        for name, recipe in RECIPES.items():
            t0 = time.perf_counter()
            torch.manual_seed(seed * 100)
            model = build_model("dnn", train.field_sizes, embed_dim=16, hidden_units=(400, 400, 400), dropout=0.3,
                                head_init=recipe["head_init"])
            summary = train_model(model, train, valid,
                                  dataclasses.replace(base, seed=seed, grad_clip_norm=recipe["grad_clip_norm"]))
            sc = scores(dev.labels, predict(model, dev))
            auc[name][seed] = sc["auc"]
            print(json.dumps({"data": a.data, "recipe": name, "seed": seed, "dev_auc": round(sc["auc"], 5),
                              "dev_logloss": round(sc["logloss"], 5), "epochs": summary["epochs"],
                              "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    diffs = [auc["fuxictr"][s] - auc["fastkd"][s] for s in auc["fastkd"]]
    spread = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    print(f"fuxictr - fastkd recipe, dev AUC per seed: {statistics.mean(diffs):+.4f} ± {spread:.4f} "
          f"({', '.join(f'{d:+.4f}' for d in diffs)})")


if __name__ == "__main__":
    main()
