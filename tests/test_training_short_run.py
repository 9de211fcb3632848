"""A short run learns: 3 epochs on a small synthetic set clearly beat the untrained network."""

from training.data import load_reid_data
from training.engine import RunOptions, train
from training.recipes import get_recipe, override
from training.synth import generate_dataset


def test_three_epochs_of_the_hacnn_recipe_beat_the_untrained_network(tmp_path):
    generate_dataset(tmp_path / "data", identities=60, seed=2, progress=False)  # 30 training identities
    data = load_reid_data(tmp_path / "data")
    # The hacnn recipe at the demo's narrow widths and the crops' own 128x64 so that it takes
    # seconds; 16 of the 30 identities per batch.
    recipe = override(
        get_recipe("hacnn"), epochs=3, input_size=(128, 64), batch_p=16,
        model_config={"widths": [64, 128, 192], "feature_dim": 256},
    )
    assert recipe.warmup() == 0  # the point: a 3-epoch run trains at the full rate from the start
    opts = RunOptions(out=str(tmp_path / "m.safetensors"), device="cpu", eval_at_start=True, progress=False)
    summary = train(recipe, data, opts)
    before, after = summary["untrained"]["mAP"], summary["best"]["mAP"]
    assert after > before + 0.05, (before, after)
