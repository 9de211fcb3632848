"""A short run learns: 3 epochs on a small synthetic set clearly beat the untrained network."""

import pytest

from training.data import load_reid_data
from training.engine import RunOptions, train
from training.recipes import get_recipe, override
from training.synth import generate_dataset


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("short") / "data"
    generate_dataset(root, identities=40, seed=2, progress=False)
    return load_reid_data(root)


def test_three_epochs_of_the_demo_recipe_beat_the_untrained_network(small_set, tmp_path):
    # The demo recipe, narrower still and at 64x32, so that the test takes seconds.
    recipe = override(
        get_recipe("demo"), epochs=3, input_size=(64, 32), batch_p=8, batch_k=4,
        model_config={"widths": [32, 64, 96], "feature_dim": 128},
    )
    assert recipe.warmup() == 0  # the point: a 3-epoch run trains at the full rate from the start
    summary = train(recipe, small_set, RunOptions(out=str(tmp_path / "m.safetensors"), device="cpu", eval_at_start=True, progress=False))
    before, after = summary["untrained"]["mAP"], summary["best"]["mAP"]
    assert after > before + 0.1, (before, after)
