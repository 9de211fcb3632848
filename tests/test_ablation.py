"""The MGAT ablation command (training/ablation.py): end to end on the smoke config, and its summary maths."""

import json

import pytest

from models.hardware import cpu_info
from training import ablation
from training.__main__ import main


def test_smoke_ablation_runs_end_to_end_and_resumes(tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(["ablate", "--out", str(out), "--config", "smoke", "--device", "cpu", "--precision", "fp32", "--quiet"]) == 0
    table = capsys.readouterr().out
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["seed"]) for r in records] == [("untrained-hacnn", 0), ("hacnn", 0), ("hacnn-mgat", 0)]
    start, plain, mgat = records
    # The untrained start is the same network the trained runs begin from, scored before any step.
    assert start["recipe"]["model_config"] == plain["recipe"]["model_config"] and start["refinement"] is None
    assert plain["recipe"]["mgat"] is False and mgat["recipe"]["mgat"] is True
    assert set(mgat["refinement"]) == set(plain["refinement"]) == {"cnn", "refined", "refined_in_groups", "gallery_mse"}
    # The CNN side of the refinement measurement scores the same final network as the run's own evaluation.
    assert mgat["refinement"]["cnn"]["mAP"] == pytest.approx(mgat["final"]["mAP"], abs=1e-6)
    assert mgat["of_curve"] and mgat["curve"][-1][0] == 1
    # Every record says where and in which number format it ran; the table shows the format.
    assert {(r["cpu"], r["precision"]) for r in records} == {(cpu_info().summary(), "fp32")}
    assert "| hacnn-mgat | 0 | fp32 |" in table and "| untrained-hacnn | 0 | fp32 |" in table
    summary = (out / "summary.md").read_text()
    assert summary.count("| hacnn") == 2 and f"Ran on: {cpu_info().summary()}" in summary
    assert (out / "curves-smoke.png").stat().st_size > 0 and (out / "of-curves-smoke.png").stat().st_size > 0

    # A second call finds both runs finished and trains nothing.
    assert main(["ablate", "--out", str(out), "--config", "smoke", "--device", "cpu", "--quiet"]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 3


def test_unknown_variant_is_a_one_line_error(tmp_path, capsys):
    assert main(["ablate", "--out", str(tmp_path), "--config", "smoke", "--only", "nope"]) != 0
    assert "unknown variant 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "data-smoke").exists()


def _record(variant, seed, m, curve):
    final = {"rank1": m, "mAP": m, "mINP": m}
    return {"variant": variant, "seed": seed, "final": final, "curve": curve, "of_curve": [], "wall_s": 1.0}


def test_summary_gives_mean_and_sample_std_over_seeds_per_variant():
    records = [_record("a", 0, 0.2, [[2, 0.1], [4, 0.2]]), _record("a", 1, 0.4, [[2, 0.3], [4, 0.4]]), _record("b", 0, 0.5, [[4, 0.5]])]
    rows = {r["variant"]: r for r in ablation.summarize(records, ["a", "b", "c"])}
    assert set(rows) == {"a", "b"} and rows["a"]["seeds"] == [0, 1]
    assert rows["a"]["mAP"] == pytest.approx((0.3, 0.1414214), abs=1e-6)
    assert rows["b"]["mAP"] == (0.5, 0.0)
    curve = ablation.mean_curves(records, ["a", "b"])["a"]
    assert [e for e, _ in curve] == [2, 4] and [v for _, v in curve] == pytest.approx([0.2, 0.3])


def test_every_config_names_known_variants_and_each_variant_builds_a_recipe():
    for config in ablation.CONFIGS.values():
        for variant in ablation.select_variants(config, None):
            recipe = ablation.variant_recipe(config, variant, seed=1)
            assert recipe.seed == 1 and recipe.mgat == variant.mgat and recipe.arch == variant.arch
    knob = ablation.variant_recipe(ablation.CONFIGS["full"], ablation.VARIANTS_BY_NAME["hacnn-mgat-fixed-w"], 0)
    assert knob.mgat_learnable_w is False and knob.of_detach is True
