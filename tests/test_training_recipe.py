"""Gradient clipping (``TrainConfig.grad_clip_norm``) and the output layer's initialisation
(``head_init``, ``ExperimentSpec.student_head_init``): FuxiCTR's recipe as options."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import quick_config
from fastkd.data import make_synthetic
from fastkd.experiment import ExperimentSpec, parse_ablation
from fastkd.models import build_model
from fastkd.train import train_model

SIZES = [7, 11, 5]


def _trained(clip):
    train, valid, _ = make_synthetic(1500, n_fields=4, seed=0).split((0.8, 0.1, 0.1))
    torch.manual_seed(0)
    model = build_model("dnn", train.field_sizes, embed_dim=4, hidden_units=(16,))
    train_model(model, train, valid, quick_config(max_epochs=1, grad_clip_norm=clip))
    return model.state_dict()


def test_clipping_changes_steps_only_when_the_norm_is_above_it():
    # mutations caught: the option never applied (tiny norm = no clipping), or applied always
    # (a norm no gradient reaches changes nothing)
    plain, huge, tiny = _trained(None), _trained(1e9), _trained(1e-4)
    assert all(torch.equal(plain[k], huge[k]) for k in plain)
    assert any(not torch.equal(plain[k], tiny[k]) for k in plain if plain[k].is_floating_point())


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "10"])
def test_clip_norm_bad_values(bad):
    from fastkd import TrainConfig

    with pytest.raises(ValueError, match="grad_clip_norm must be None or a finite number > 0"):
        TrainConfig(grad_clip_norm=bad)


@pytest.mark.parametrize("name", ["dnn", "deepfm", "dcn", "dcnv2", "xdeepfm", "autoint", "widedeep"])
def test_head_init(name):
    torch.manual_seed(0)
    default = build_model(name, SIZES, embed_dim=4, hidden_units=(16,))
    torch.manual_seed(0)
    xavier = build_model(name, SIZES, embed_dim=4, hidden_units=(16,), head_init="xavier")
    assert float(default.head.bias.detach().abs().sum()) > 0  # nn.Linear's own uniform bias
    assert float(xavier.head.bias.detach().abs().sum()) == 0
    w = xavier.head.weight
    assert w.detach().std().item() == pytest.approx(math.sqrt(2.0 / (w.shape[1] + 1)), rel=0.5)
    with pytest.raises(ValueError, match="head_init must be one of"):
        build_model(name, SIZES, embed_dim=4, hidden_units=(16,), head_init="he")


def test_student_head_init_reaches_students_and_the_plain_dnn_only():
    spec = ExperimentSpec(student_dropout=0.1, student_head_init="xavier", model_kwargs={"embed_dim": 4})
    assert spec.student_kwargs["head_init"] == "xavier" and "head_init" not in spec.model_kwargs
    abl = parse_ablation("student_head_init=xavier+grad_clip_norm=10", ExperimentSpec())
    assert abl.plain and abl.overrides == {"student_head_init": "xavier", "grad_clip_norm": 10}
    with pytest.raises(ValueError, match="student_head_init must be None or one of"):
        ExperimentSpec(student_head_init="he")


def test_teachers_are_not_clipped():
    # the student network's option: an ablation row of it shares the run's teachers
    from fastkd import TrainConfig

    assert TrainConfig(grad_clip_norm=10.0).for_teachers().grad_clip_norm is None
    assert TrainConfig(grad_clip_norm=10.0).grad_clip_norm == 10.0


def test_the_report_states_the_recipe_when_set():
    # mutation caught: a run trained with clipping or another output-layer start whose report is silent
    from fastkd import TrainConfig
    from fastkd.experiment.report import _settings

    plain = _settings(ExperimentSpec())
    assert "clipped" not in plain and "output layer" not in plain
    text = _settings(ExperimentSpec(student_head_init="xavier", config=TrainConfig(grad_clip_norm=10.0)))
    assert "gradients clipped to a total norm of 10 before each step (teachers: none)" in text
    assert "output layer initialised xavier" in text
