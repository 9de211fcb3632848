"""The MGAT ablation: declared variants x seeds, same budget, one synthetic set, resumable.

    python -m training ablate --out DIR [--config smoke|full] [--seeds 0,1,2] [--only NAME ...] [--precision auto]

DIR/data-<config>/         the synthetic set (training.synth, fixed seed), rendered once
DIR/runs/<variant>/seed<s>/ each run's checkpoint, train state and log (engine.train)
DIR/results.jsonl          one line per finished run; a rerun skips the (config, variant, seed)
                           already there, so an interrupted ablation resumes
DIR/summary.md, DIR/curves-<config>.png   the table and the learning curves (held-out mAP)
DIR/of-curves-<config>.png                the OF loss MSE(X, X') per epoch of the MGAT variants

Every run is scored at its last epoch (not its best one: picking the best epoch by test mAP
would select on the test set). Every run is also scored with an MGAT-refined gallery
(training.refinement): MGAT runs with their trained W, the others without W as a control.
See docs/training.md, "The MGAT ablation".
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models import IMAGENET_MEAN, IMAGENET_STD
from models.hardware import cpu_info
from training import engine, recipes
from training.data import ReIDData, load_reid_data
from training.embeddings import evaluate_model
from training.refinement import refinement_metrics
from training.synth import generate_dataset

METRICS = ("rank1", "mAP", "mINP")


@dataclass(frozen=True)
class Variant:
    name: str
    arch: str  # hacnn | resnet50
    mgat: bool
    changes: dict = field(default_factory=dict)  # recipe overrides: what this variant changes


# The knob grid runs on the cheaper model (HA-CNN); "hacnn-mgat" is its centre (the defaults).
VARIANTS = (
    Variant("hacnn", "hacnn", False),
    Variant("hacnn-32x1", "hacnn", False, {"batch_p": 32, "batch_k": 1}),
    Variant("hacnn-mgat", "hacnn", True),
    Variant("hacnn-mgat-gamma0.5", "hacnn", True, {"mgat_gamma": 0.5}),
    Variant("hacnn-mgat-gamma2", "hacnn", True, {"mgat_gamma": 2.0}),
    Variant("hacnn-mgat-of0", "hacnn", True, {"of_weight": 0.0}),
    Variant("hacnn-mgat-of2", "hacnn", True, {"of_weight": 2.0}),
    Variant("hacnn-mgat-undetached", "hacnn", True, {"of_detach": False}),
    Variant("hacnn-mgat-fixed-w", "hacnn", True, {"mgat_learnable_w": False}),
    Variant("resnet50", "resnet50", False),
    Variant("resnet50-mgat", "resnet50", True),
    # The OF loss's control on the network that learns: does the CNN approach X' without it?
    Variant("resnet50-mgat-of0", "resnet50", True, {"of_weight": 0.0}),
)
VARIANTS_BY_NAME = {v.name: v for v in VARIANTS}


@dataclass(frozen=True)
class AblationConfig:
    name: str
    identities: int  # synthetic identities, half for training, half held out
    cameras: int
    data_seed: int
    seeds: tuple[int, ...]
    variants: tuple[str, ...]
    arch_changes: dict  # arch -> recipe overrides shared by all its variants (size, budget, schedule)


_SMOKE_HACNN = {
    "model_config": {"widths": [16, 32, 48], "stem_channels": 16, "feature_dim": 16},
    "input_size": (64, 32),
    "epochs": 1,
    "batch_p": 4,
    "batch_k": 2,
    "warmup_epochs": 0,
    "lr_steps": (),
    "eval_every": 1,
}

# The schedule overrides (lr, warm-up, steps) fit a short run; see docs/training.md for the sizes.
# Every variant samples 8 identities x 4 images (MGAT's graph needs K > 1), so the sampler is
# not what differs; `hacnn-32x1` is the HA-CNN recipe's own sampler, for reference.
_FULL_SCHEDULE = {
    "lr": 1e-3, "warmup_epochs": 1, "warmup_fraction": 0.125, "lr_steps": (0.75,), "first_step_epoch": 0,
    "batch_p": 8, "batch_k": 4, "eval_every": 2,
}
_FULL = {
    "hacnn": {
        "model_config": {"widths": [64, 128, 192], "feature_dim": 256},
        "input_size": (64, 32),
        "epochs": 8,
        "pad": 4,
        **_FULL_SCHEDULE,
    },
    # At 64x32 for 8 epochs ResNet-50 from scratch barely left its start (mAP 0.06 -> 0.10); at the
    # synthetic crops' own 128x64 a baseline pilot reached 0.36 after 8 epochs and 0.71 after 24.
    "resnet50": {
        "model_config": {"last_stride": 1},
        "input_size": (128, 64),
        "epochs": 24,
        "pad": 4,
        **_FULL_SCHEDULE,
        "eval_every": 4,
    },
}

CONFIGS = {
    "smoke": AblationConfig("smoke", 8, 3, 0, (0,), ("hacnn", "hacnn-mgat"), {"hacnn": _SMOKE_HACNN}),
    # One step away from MGAT's defaults per knob (the rest of the grid: `--only NAME`), so that
    # every variant gets 3 seeds: about 2 hours on 2 cores with AMX (bf16), 20 min of it HA-CNN.
    "full": AblationConfig("full", 200, 6, 0, (0, 1, 2), (
        "hacnn", "hacnn-mgat", "hacnn-mgat-gamma2", "hacnn-mgat-of0", "hacnn-mgat-undetached",
        "hacnn-mgat-fixed-w", "resnet50", "resnet50-mgat", "resnet50-mgat-of0"), _FULL),
}


def variant_recipe(config: AblationConfig, variant: Variant, seed: int) -> recipes.Recipe:
    """The arch's default recipe, then the config's size/budget, then the variant's change."""
    base = recipes.recipe_for(variant.arch, variant.mgat)
    recipe = recipes.override(base, **config.arch_changes.get(variant.arch, {}))
    return recipes.override(recipe, name=variant.name, seed=seed, **variant.changes)


def select_variants(config: AblationConfig, only: list[str] | None) -> list[Variant]:
    names = list(only) if only else list(config.variants)
    unknown = [n for n in names if n not in VARIANTS_BY_NAME]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS_BY_NAME)}")
    return [VARIANTS_BY_NAME[n] for n in names]


def ensure_data(out: Path, config: AblationConfig, progress: bool = True) -> ReIDData:
    """The config's synthetic set under DIR, rendered unless a finished rendering is there."""
    folder = out / f"data-{config.name}"
    marker = folder / "counts.json"
    if not marker.is_file():
        counts = generate_dataset(
            folder, identities=config.identities, cameras=config.cameras, seed=config.data_seed,
            progress=progress, overwrite=True,
        )
        marker.write_text(json.dumps(counts))
    return load_reid_data(folder)


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_key(record: dict) -> tuple[str, str, int]:
    return record["config"], record["variant"], int(record["seed"])


def train_one(recipe: recipes.Recipe, data: ReIDData, run_dir: Path, device: str, precision: str) -> dict:
    """Train one variant/seed from scratch and return its result record (without config/variant)."""
    if run_dir.exists():  # an interrupted run: start it again
        shutil.rmtree(run_dir)
    t0 = time.time()
    opts = engine.RunOptions(out=str(run_dir / "model.safetensors"), device=device, precision=precision, progress=False)
    summary = engine.train(recipe, data, opts)
    log = [json.loads(line) for line in Path(summary["log"]).read_text().splitlines()]
    record = {
        "seed": recipe.seed,
        "recipe": recipe.to_dict(),
        **machine_fields(summary["precision"]),
        "final": summary["last"],
        "curve": [[r["epoch"], r["eval"]["mAP"]] for r in log if "eval" in r],
        "of_curve": [[r["epoch"], r["of"]] for r in log if "of" in r],
        "train_time_s": summary["train_time_s"],
        "refinement": _refinement(recipe, data, summary["state"], device),
    }
    record["wall_s"] = round(time.time() - t0, 1)
    return record


def _refinement(recipe: recipes.Recipe, data: ReIDData, state_path: str, device: str) -> dict:
    """CNN vs refined-gallery figures of the final network (the train state: it holds MGAT's W).
    A run without MGAT is refined with the recipe's gamma and no W: the control, what the graph
    and the gallery's labels alone add to a network never trained with them."""
    state = engine.read_state(state_path)
    model = engine.build_network(recipe, data.num_train_ids)
    net = engine.TrainingNet(model, recipe, data.num_train_ids)
    net.load_state_dict(state["net"])
    dev = engine.resolve_device(device)
    net.to(dev)
    weight = net.mgat.weight if net.mgat is not None else None
    return refinement_metrics(net.model, recipe.mgat_gamma, weight, data, IMAGENET_MEAN, IMAGENET_STD, dev)


def machine_fields(precision: str) -> dict:
    """Where a run ran: the processor (model and matrix flags) and the training number format."""
    return {"cpu": cpu_info().summary(), "precision": precision}


def untrained_name(arch: str) -> str:
    return f"untrained-{arch}"


def untrained_one(recipe: recipes.Recipe, data: ReIDData, device: str) -> dict:
    """The held-out scores of the arch's network as initialised with this seed, never trained:
    the start every trained variant must clearly beat."""
    t0 = time.time()
    torch.manual_seed(recipe.seed)  # as engine.train seeds the initial weights
    model = engine.build_network(recipe, data.num_train_ids).to(engine.resolve_device(device))
    metrics, _ = evaluate_model(model, data, IMAGENET_MEAN, IMAGENET_STD, engine.resolve_device(device))
    return {"seed": recipe.seed, "recipe": recipe.to_dict(), **machine_fields("fp32"), "final": metrics, "curve": [[0, metrics["mAP"]]],
            "of_curve": [], "train_time_s": 0.0, "refinement": None, "wall_s": round(time.time() - t0, 1)}


def rescore_refinement(out: str | Path, config: AblationConfig, device: str = "cpu", say=print) -> None:
    """Recompute the refinement figures of every finished training run from its saved state."""
    out = Path(out)
    path = out / "results.jsonl"
    records = read_results(path)
    data = ensure_data(out, config, progress=False)
    for r in records:
        if r["config"] == config.name and r.get("refinement") is not None:
            recipe = variant_recipe(config, VARIANTS_BY_NAME[r["variant"]], int(r["seed"]))
            state = out / "runs" / r["variant"] / f"seed{r['seed']}" / "model.train-state.pt"
            r["refinement"] = _refinement(recipe, data, str(state), device)
            say(f"rescored {r['variant']} seed {r['seed']}: refined mAP {r['refinement']['refined']['mAP']:.3f}")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def run_ablation(
    out: str | Path, config: AblationConfig, seeds: list[int] | None = None, only: list[str] | None = None,
    device: str = "cpu", progress: bool = True, say=print, precision: str = "auto",
) -> list[dict]:
    """Train every (variant, seed) not yet in DIR/results.jsonl; returns this config's records."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    variants = select_variants(config, only)
    seeds = list(config.seeds) if seeds is None else list(seeds)
    data = ensure_data(out, config, progress)
    results_path = out / "results.jsonl"
    done = {run_key(r) for r in read_results(results_path)}
    # Each arch's untrained start first (seconds), then the training runs.
    starts = {v.arch: Variant(untrained_name(v.arch), v.arch, False) for v in variants}
    todo = [(v, s) for v in [*starts.values(), *variants] for s in seeds if (config.name, v.name, s) not in done]
    say(f"ablation {config.name}: {len(variants)} variants x {len(seeds)} seeds, {len(todo)} runs to do "
        f"on {json.dumps(data.counts())}")
    for i, (variant, seed) in enumerate(todo, 1):
        recipe = variant_recipe(config, variant, seed)
        if recipe.batch_p > data.num_train_ids:
            raise ValueError(f"{variant.name}: batch_p {recipe.batch_p} > {data.num_train_ids} training identities")
        say(f"[{i}/{len(todo)}] {variant.name} seed {seed}")
        if variant.name.startswith("untrained-"):
            result = untrained_one(recipe, data, device)
        else:
            result = train_one(recipe, data, out / "runs" / variant.name / f"seed{seed}", device, precision)
        record = {"config": config.name, "variant": variant.name, **result}
        with open(results_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        say(f"[{i}/{len(todo)}] {variant.name} seed {seed}: mAP {record['final']['mAP']:.3f} "
            f"rank1 {record['final']['rank1']:.3f} in {record['wall_s']:.0f} s")
    wanted = {(config.name, v.name, s) for v in [*starts.values(), *variants] for s in seeds}
    return [r for r in read_results(results_path) if run_key(r) in wanted]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize(records: list[dict], order: list[str]) -> list[dict]:
    """One row per variant (in ``order``): seeds, mean/std of each metric, refined-gallery mAP."""
    rows = []
    for name in order:
        runs = [r for r in records if r["variant"] == name]
        if not runs:
            continue
        row = {"variant": name, "seeds": sorted(int(r["seed"]) for r in runs),
               "precision": ",".join(sorted({r.get("precision", "?") for r in runs}))}
        for m in METRICS:
            row[m] = mean_std([r["final"][m] for r in runs])
        refined = [r["refinement"] for r in runs if r.get("refinement")]
        if refined:
            row["cnn_mAP"] = mean_std([x["cnn"]["mAP"] for x in refined])
            row["refined_mAP"] = mean_std([x["refined"]["mAP"] for x in refined])
            row["gallery_mse"] = mean_std([x["gallery_mse"] for x in refined])
        row["of_last"] = mean_std([r["of_curve"][-1][1] for r in runs]) if all(r["of_curve"] for r in runs) else None
        row["wall_s"] = mean_std([r["wall_s"] for r in runs])
        rows.append(row)
    return rows


def _pm(ms: tuple[float, float] | None, digits: int = 3) -> str:
    return "-" if ms is None else f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def summary_markdown(rows: list[dict]) -> str:
    head = ("| variant | seeds | precision | rank-1 | mAP | mINP | CNN mAP (final net) | refined-gallery mAP | "
            "gallery MSE(X, X') | last-epoch OF loss | wall s/run |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {','.join(map(str, r['seeds']))} | {r['precision']} | {_pm(r['rank1'])} | {_pm(r['mAP'])} | "
            f"{_pm(r['mINP'])} | {_pm(r.get('cnn_mAP'))} | {_pm(r.get('refined_mAP'))} | "
            f"{_pm(r.get('gallery_mse'), 4)} | {_pm(r['of_last'], 4)} | {r['wall_s'][0]:.0f} |"
        )
    return "\n".join(lines) + "\n"


def mean_curves(records: list[dict], order: list[str], key: str = "curve") -> dict[str, list[tuple[int, float]]]:
    """Per variant: (epoch, value averaged over the seeds recorded at that epoch) of one of the
    records' per-epoch series: ``curve`` (held-out mAP) or ``of_curve`` (the OF loss)."""
    curves = {}
    for name in order:
        by_epoch: dict[int, list[float]] = {}
        for r in records:
            if r["variant"] == name:
                for epoch, value in r[key]:
                    by_epoch.setdefault(int(epoch), []).append(float(value))
        if by_epoch:
            curves[name] = [(e, float(np.mean(v))) for e, v in sorted(by_epoch.items())]
    return curves


def write_summary(out: str | Path, config: AblationConfig, records: list[dict], order: list[str]) -> tuple[str, list[Path]]:
    """The markdown table, and the files: DIR/summary.md, DIR/curves-<config>.png (held-out mAP)
    and DIR/of-curves-<config>.png (the OF loss, MSE(X, X'), of the MGAT variants)."""
    from training.visualize import write_line_plot

    out = Path(out)
    table = summary_markdown(summarize(records, order))
    md = out / "summary.md"
    cpus = sorted({r.get("cpu", "unknown CPU") for r in records})
    md.write_text(f"# MGAT ablation, config {config.name}\n\nRan on: {'; '.join(cpus)}\n\n{table}")
    trained = [name for name in order if not name.startswith("untrained-")]  # one point, no curve
    curves = write_line_plot(
        mean_curves(records, trained), out / f"curves-{config.name}.png",
        title=f"MGAT ablation ({config.name}): held-out mAP per evaluated epoch, mean over seeds",
        x_label="epoch", y_label="mAP",
    )
    of_curves = write_line_plot(
        mean_curves(records, trained, key="of_curve"), out / f"of-curves-{config.name}.png",
        title=f"MGAT ablation ({config.name}): OF loss MSE(X, X') per training epoch, mean over seeds",
        x_label="epoch", y_label="OF loss",
    )
    return table, [md, curves, of_curves]
