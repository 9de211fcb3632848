"""Each recipe's network and losses learn: a few steps on one batch lower the loss (CPU, small inputs)."""

import dataclasses

import pytest
import torch

from training.engine import TrainingNet, build_network, lr_factor, make_optimizer
from training.recipes import get_recipe, override, recipe_for


def _steps_lower_the_loss(recipe, num_classes=4, steps=4):
    torch.manual_seed(0)
    net = TrainingNet(build_network(recipe, num_classes), recipe, num_classes).train()
    opt = make_optimizer(recipe, net.parameters())
    h, w = recipe.input_size
    images = torch.randn(num_classes * 2, 3, h, w)
    labels = torch.arange(num_classes).repeat_interleave(2)
    losses = []
    for _ in range(steps):
        total, parts = net(images, labels)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    return losses, parts


def test_hacnn_recipe_learns():
    recipe = override(recipe_for("hacnn"), input_size=(64, 32))
    losses, parts = _steps_lower_the_loss(recipe)
    assert set(parts) == {"id"}  # cross-entropy on both branches, no triplet
    assert losses[-1] < losses[0]


def test_resnet50_baseline_recipe_learns():
    recipe = override(recipe_for("resnet50"), input_size=(64, 32))
    assert recipe.model_config["last_stride"] == 1
    losses, parts = _steps_lower_the_loss(recipe)
    assert set(parts) == {"id", "triplet"}
    assert losses[-1] < losses[0]


def test_resnet50_mgat_recipe_learns():
    recipe = override(recipe_for("resnet50", mgat=True), input_size=(64, 32))
    losses, parts = _steps_lower_the_loss(recipe)
    assert set(parts) == {"id", "triplet", "mgat_id", "of"}
    assert losses[-1] < losses[0]


def test_demo_recipe_learns():
    losses, _ = _steps_lower_the_loss(override(get_recipe("demo"), input_size=(64, 32)))
    assert losses[-1] < losses[0]


def test_schedule_warms_up_then_steps_down():
    r = dataclasses.replace(get_recipe("resnet50"), epochs=120)
    assert r.lr_step_epochs() == [40, 70]
    assert lr_factor(r, 0) == pytest.approx(0.1)
    assert lr_factor(r, 5) == pytest.approx(0.55)
    assert lr_factor(r, 10) == 1.0 and lr_factor(r, 39) == 1.0
    assert lr_factor(r, 40) == pytest.approx(0.1) and lr_factor(r, 70) == pytest.approx(0.01)
    short = dataclasses.replace(r, epochs=3, warmup_epochs=1)  # the 1/3 step would fall in the warm-up
    assert short.lr_step_epochs() == [2]
    assert [lr_factor(short, e) for e in range(3)] == pytest.approx([0.1, 1.0, 0.1])


def test_override_ignores_unset_options_and_rejects_unknown_ones():
    r = override(get_recipe("hacnn"), lr=0.01, margin=None)
    assert r.lr == 0.01 and r.margin == get_recipe("hacnn").margin
    with pytest.raises(ValueError, match="unknown recipe fields"):
        override(r, learning_rate=1.0)
