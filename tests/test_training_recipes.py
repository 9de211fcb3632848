"""Each recipe's network and losses learn: a few steps on one batch lower the loss (CPU, small inputs)."""

import dataclasses

import pytest
import torch

from training.engine import TrainingNet, build_network, lr_factor, make_optimizer
from models import list_models
from training.recipes import RECIPES, get_recipe, override, recipe_for


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


def test_hacnn_mgat_recipe_learns():
    losses, parts = _steps_lower_the_loss(override(get_recipe("hacnn-mgat"), input_size=(64, 32)))
    assert set(parts) == {"id", "mgat_id", "of"}
    assert losses[-1] < losses[0]


def test_demo_recipe_learns():
    losses, _ = _steps_lower_the_loss(override(get_recipe("demo"), input_size=(64, 32)))
    assert losses[-1] < losses[0]


def test_schedule_warms_up_then_steps_down():
    r = dataclasses.replace(get_recipe("resnet50"), epochs=120)
    assert r.warmup() == 10 and r.lr_step_epochs() == [40, 70]
    assert lr_factor(r, 0) == pytest.approx(0.1)
    assert lr_factor(r, 5) == pytest.approx(0.55)
    assert lr_factor(r, 10) == 1.0 and lr_factor(r, 39) == 1.0
    assert lr_factor(r, 40) == pytest.approx(0.1) and lr_factor(r, 70) == pytest.approx(0.01)


@pytest.mark.parametrize(
    "name, epochs, warmup, steps",
    [
        ("hacnn", 3, 0, []),
        ("hacnn", 8, 0, []),  # no step before epoch 20: a short run keeps the full rate
        ("hacnn", 24, 2, [20]),
        ("hacnn", 150, 5, [100, 125]),  # 10% would be 15 epochs: capped at 5
        ("resnet50", 3, 0, [1, 2]),
        ("resnet50", 8, 0, [3, 5]),
        ("resnet50", 150, 10, [50, 88]),
        ("demo", 3, 0, [2]),
        ("demo", 8, 1, [6]),
    ],
)
def test_warmup_and_steps_scale_with_the_run(name, epochs, warmup, steps):
    r = override(get_recipe(name), epochs=epochs)
    assert r.warmup() == warmup
    assert r.lr_step_epochs() == steps
    factors = [lr_factor(r, e) for e in range(epochs)]
    assert factors[warmup] == 1.0  # full rate right after the warm-up...
    assert factors[-1] == pytest.approx(0.1 ** len(steps))  # ...and lower at the end once per step


def test_a_short_run_is_not_all_warm_up():
    for name in RECIPES:
        r = override(get_recipe(name), epochs=3)
        assert lr_factor(r, 0) == 1.0, name  # no warm-up in 3 epochs: the first one trains at the full rate


def test_an_explicit_warm_up_is_kept_when_the_fraction_allows_it():
    r = override(get_recipe("resnet50"), epochs=6, warmup_epochs=2, warmup_fraction=0.5)
    assert r.warmup() == 2 and lr_factor(r, 1) == pytest.approx(0.55) and lr_factor(r, 2) == 1.0


def test_every_architecture_has_a_recipe_with_and_without_mgat():
    for arch in list_models():
        assert recipe_for(arch).arch == arch and not recipe_for(arch).mgat
        with_mgat = recipe_for(arch, mgat=True)
        assert with_mgat.name == f"{arch}-mgat" and with_mgat.mgat and with_mgat.name in RECIPES
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        recipe_for("vgg")


def test_override_ignores_unset_options_and_rejects_unknown_ones():
    r = override(get_recipe("hacnn"), lr=0.01, margin=None)
    assert r.lr == 0.01 and r.margin == get_recipe("hacnn").margin
    with pytest.raises(ValueError, match="unknown recipe fields"):
        override(r, learning_rate=1.0)
