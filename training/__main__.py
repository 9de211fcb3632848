"""Command line: ``python -m training {synth,train,eval,init,demo,calibrate,openset,ablate}``.

Every failure the user can cause (missing folder, wrong layout, unreadable checkpoint, bad
option) ends with one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from models.zoo import list_models
from training.ablation import CONFIGS as ABLATION_CONFIGS
from training.calibration import DEFAULT_FAR
from training.precision import PRECISIONS
from training.recipes import RECIPES

EXIT_ERROR = 2


class CliError(Exception):
    """A user-facing failure: printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + error
        raise CliError(f"{self.prog}: {message}")


def _add_recipe_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("recipe overrides (defaults come from the recipe; see docs/training.md)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--optimizer", choices=["adam", "sgd"])
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--warmup-epochs", type=int, help="the longest warm-up, in epochs")
    g.add_argument("--warmup-fraction", type=float, help="warm-up as a fraction of the run (capped by --warmup-epochs)")
    g.add_argument("--lr-steps", type=float, nargs="*", metavar="FRACTION", help="lr decay points as fractions of the epochs")
    g.add_argument("--lr-decay", type=float)
    g.add_argument("--first-step-epoch", type=int, help="no lr step before this epoch")
    g.add_argument("--batch-p", type=int, help="identities per batch")
    g.add_argument("--batch-k", type=int, help="images per identity in a batch")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--triplet-weight", type=float, help="0 turns the triplet loss off")
    g.add_argument("--margin", type=float, help="triplet margin")
    g.add_argument("--soft-margin", action="store_true", default=None, help="soft-margin triplet instead of the hinge")
    g.add_argument("--mgat-gamma", type=float)
    g.add_argument("--mgat-weight", type=float, help="weight of MGAT's identity loss")
    g.add_argument("--of-weight", type=float, help="weight of the optimisation-feedback loss")
    g.add_argument("--erase-p", type=float, help="random-erasing probability")
    g.add_argument("--flip-p", type=float)
    g.add_argument("--pad", type=int, help="pad-and-crop margin in pixels")
    g.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"))
    g.add_argument("--eval-every", type=int, help="evaluate every N epochs (0: at the end only)")
    g.add_argument("--seed", type=int)


_RECIPE_OPTIONS = (
    "epochs lr optimizer weight_decay momentum warmup_epochs warmup_fraction lr_steps lr_decay first_step_epoch batch_p batch_k label_smoothing "
    "triplet_weight margin soft_margin mgat_gamma mgat_weight of_weight erase_p flip_p pad input_size eval_every seed"
).split()


def _recipe_changes(args) -> dict:
    changes = {k: getattr(args, k) for k in _RECIPE_OPTIONS}
    if changes.get("lr_steps") is not None:
        changes["lr_steps"] = tuple(changes["lr_steps"])
    return changes


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m training", description="Train and evaluate person re-identification models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("synth", help="render a synthetic Market-1501-layout dataset")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--identities", type=int, default=200)
    p.add_argument("--cameras", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace the images of an existing set")

    p = sub.add_parser("train", help="train a model on a Market-1501-layout folder")
    p.add_argument("--arch", choices=list_models(), help="required unless --resume or --recipe")
    p.add_argument("--mgat", action="store_true", help="add MGAT's identity and OF losses")
    p.add_argument("--recipe", choices=list(RECIPES), help="start from a named recipe")
    p.add_argument("--data", required=True, help="Market-1501-layout folder")
    p.add_argument("--out", required=True, help="serving checkpoint to write (.safetensors)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--resume", metavar="STATE", help="a .train-state.pt file written by an earlier run")
    p.add_argument("--workers", type=int, help="DataLoader processes (default: 0 on <= 2 cores)")
    p.add_argument("--imagenet-weights", metavar="PATH", help="torchvision resnet50 state dict (.pth or .safetensors)")
    p.add_argument("--no-amp", action="store_true", help="no fp16 mixed precision on a CUDA GPU without bf16")
    p.add_argument(
        "--precision", choices=PRECISIONS, default="auto",
        help="auto: bf16 autocast where the CPU or GPU has native bf16, else fp32 (fp16 AMP on older GPUs)",
    )
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_recipe_options(p)

    p = sub.add_parser("eval", help="evaluate a checkpoint on query/gallery (last line: JSON)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--visualize", metavar="DIR", help="write ranking pictures for a few queries and the score histograms here")
    p.add_argument("--num-queries", type=int, default=8, help="queries to draw with --visualize")
    p.add_argument("--top-k", type=int, default=10, help="gallery crops per query with --visualize")

    p = sub.add_parser("init", help="write an untrained (or ImageNet-initialised) serving checkpoint")
    p.add_argument("--arch", required=True, choices=list_models())
    p.add_argument("--out", required=True)
    p.add_argument("--imagenet-weights", metavar="PATH")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("demo", help="synthetic data + a fast HA-CNN, into one folder (minutes on a CPU)")
    p.add_argument("--out", required=True, help="folder: writes data/ and model.safetensors")
    p.add_argument("--identities", type=int, default=300)
    p.add_argument("--epochs", type=int, default=None, help="default: the demo recipe's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("calibrate", help="fit the match threshold at a FAR on query/gallery and store it in the checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="Market-1501-layout folder: held-out identities in query/ and bounding_box_test/")
    p.add_argument("--far", type=float, default=DEFAULT_FAR, help="false accept rate the threshold is fitted at (default 0.001)")
    p.add_argument("--out", help="write the calibrated checkpoint here instead of replacing --checkpoint")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)

    p = sub.add_parser("openset", help="watchlist evaluation: enroll some test identities, query with all (last line: JSON)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--enroll-fraction", type=float, default=0.5, help="share of the test identities enrolled")
    p.add_argument("--repeats", type=int, default=5, help="random watchlists averaged")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, help="default: the checkpoint's calibrated threshold")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)

    p = sub.add_parser("ablate", help="the MGAT ablation: variants x seeds on one synthetic set (resumable)")
    p.add_argument("--out", required=True, help="folder: data, runs, results.jsonl, summary.md, curves PNG")
    p.add_argument("--config", choices=list(ABLATION_CONFIGS), default="full")
    p.add_argument("--seeds", help="comma-separated training seeds (default: the config's)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these variants")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="training number format (auto: bf16 where the CPU or GPU has it natively)")
    p.add_argument("--rescore", action="store_true",
                   help="score the refinement of every finished run again from its saved state (after a change to it)")
    p.add_argument("--quiet", action="store_true")
    return parser


def cmd_synth(args) -> int:
    from training.synth import generate_dataset

    counts = generate_dataset(args.out, identities=args.identities, cameras=args.cameras, seed=args.seed, progress=True, overwrite=args.overwrite)
    print(json.dumps(counts))
    return 0


def cmd_train(args) -> int:
    from training import engine, recipes
    from training.data import load_reid_data

    if args.resume:
        base = recipes.Recipe(**_recipe_fields(engine.recipe_from_state(args.resume)))
        if args.arch and args.arch != base.arch:
            raise CliError(f"--arch {args.arch} but {args.resume} trains {base.arch}")
    elif args.recipe:
        base = recipes.get_recipe(args.recipe)
        if args.arch and args.arch != base.arch:
            raise CliError(f"--arch {args.arch} contradicts --recipe {args.recipe} ({base.arch})")
        if args.mgat and not base.mgat:
            name = f"{args.recipe}-mgat"
            base = recipes.get_recipe(name) if name in recipes.RECIPES else recipes.override(base, mgat=True)
    elif args.arch:
        base = recipes.recipe_for(args.arch, args.mgat)
    else:
        raise CliError("train: --arch is required (or --recipe, or --resume)")
    recipe = recipes.override(base, **_recipe_changes(args))
    _check_recipe(recipe)
    if args.resume:
        done = int(engine.read_state(args.resume)["epoch"])
        if done >= recipe.epochs:
            raise CliError(f"{args.resume}: already trained {done} epochs; pass a larger --epochs to continue")
    data = load_reid_data(args.data)
    if recipe.batch_p > data.num_train_ids and args.batch_p is None:
        # A small set has fewer identities than the recipe's batch wants: take them all (as the demo does).
        recipe = recipes.override(recipe, batch_p=data.num_train_ids)
        _check_recipe(recipe)
    if recipe.batch_p > data.num_train_ids:
        raise CliError(
            f"--batch-p {recipe.batch_p} identities per batch, but {args.data} has only {data.num_train_ids} training identities"
        )
    opts = engine.RunOptions(
        out=args.out,
        device=args.device,
        workers=args.workers,
        amp=not args.no_amp,
        precision=args.precision,
        eval_batch_size=args.eval_batch_size,
        imagenet_weights=args.imagenet_weights,
        progress=not args.quiet,
    )
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    if is_main:
        print(f"recipe {recipe.name}: {json.dumps(recipe.to_dict())}", file=sys.stderr)
        print(f"data {data.root}: {json.dumps(data.counts())}", file=sys.stderr)
    summary = engine.train(recipe, data, opts, resume=args.resume)
    if is_main:
        print(json.dumps(summary))
    return 0


def _recipe_fields(d: dict) -> dict:
    from training.recipes import Recipe
    import dataclasses

    names = {f.name for f in dataclasses.fields(Recipe)}
    fields = {k: v for k, v in d.items() if k in names}
    fields["input_size"] = tuple(fields["input_size"])
    fields["lr_steps"] = tuple(fields["lr_steps"])
    return fields


def _check_recipe(r) -> None:
    if r.epochs < 1:
        raise CliError("--epochs must be at least 1")
    if r.batch_p < 2 or r.batch_k < 1:
        raise CliError("--batch-p must be at least 2 and --batch-k at least 1")
    if r.batch_k < 2 and (r.mgat or r.triplet_weight > 0):
        raise CliError("--batch-k must be at least 2 with MGAT or the triplet loss (they compare images of one identity)")
    if r.lr <= 0:
        raise CliError("--lr must be positive")
    if min(r.input_size) < 32:
        raise CliError("--input-size must be at least 32 x 32")
    if r.arch == "hacnn":
        # three stride-2 stages after the stem, and the height splits into num_regions stripes at each
        step = 8 * r.model_config.get("num_regions", 4)
        if r.input_size[0] % step or r.input_size[1] % 8:
            raise CliError(f"--input-size for HA-CNN: height must be a multiple of {step} and width of 8")
    if not 0 <= r.warmup_fraction <= 1 or r.warmup_epochs < 0:
        raise CliError("--warmup-fraction must be in [0, 1] and --warmup-epochs at least 0")
    if not 0 <= r.label_smoothing < 1:
        raise CliError("--label-smoothing must be in [0, 1)")


def cmd_eval(args) -> int:
    from models.progress import progress

    from training.embeddings import evaluate_model

    model, info, data, device = _load_for_scoring(args)
    with progress(total=len(data.query) + len(data.gallery), desc="embed", unit="img") as bar:
        metrics, distmat = evaluate_model(
            model, data, info.mean, info.std, device, batch_size=args.batch_size, workers=args.workers, progress=bar
        )
    from training.calibration import pair_scores, tar_at_far
    from training.embeddings import query_gallery_labels

    genuine, impostor = pair_scores(1.0 - distmat, *query_gallery_labels(data))
    if args.visualize:
        from training.visualize import write_rankings

        paths = write_rankings(distmat, data.query, data.gallery, args.visualize, num_queries=args.num_queries, top_k=args.top_k)
        paths.append(_draw_scores(genuine, impostor, info, Path(args.visualize) / "scores.png"))
        print(f"wrote {len(paths)} pictures to {args.visualize} (scores.png: the score histograms)", file=sys.stderr)
    print(f"{info.model_name} on {data.root}: {json.dumps(data.counts())}", file=sys.stderr)
    result = {k: round(v, 6) for k, v in metrics.items()}
    result["tar_at_far"] = tar_at_far(genuine, impostor)
    print(json.dumps(result))
    return 0


def _draw_scores(genuine, impostor, info, path: Path) -> Path:
    """The two score histograms with the checkpoint's threshold, or without calibration the one
    this data gives at the default FAR."""
    from training.calibration import far_key, score_histogram, threshold_at_far
    from training.visualize import write_score_histograms

    if info.match_threshold is not None:
        threshold = info.match_threshold
        note = f"checkpoint's threshold {threshold:.3f} (FAR {far_key(info.calibration.get('far', DEFAULT_FAR))})"
    else:
        threshold = threshold_at_far(impostor, DEFAULT_FAR)
        note = f"uncalibrated checkpoint; threshold at FAR {far_key(DEFAULT_FAR)} on this data: {threshold:.3f}"
    title = f"{info.model_name}: {len(genuine)} same-person, {len(impostor)} different-people pairs; {note}"
    return write_score_histograms(score_histogram(genuine, impostor), threshold, path, title)


def cmd_init(args) -> int:
    import torch

    from models import save_checkpoint
    from training.engine import build_network
    from training.recipes import recipe_for

    recipe = recipe_for(args.arch)
    torch.manual_seed(args.seed)
    model = build_network(recipe, num_classes=0, imagenet_weights=args.imagenet_weights)
    source = "imagenet" if args.imagenet_weights else "random"
    info = save_checkpoint(
        model.eval(),
        args.out,
        training={"init": source, "seed": args.seed, "imagenet_weights": args.imagenet_weights, "recipe": recipe.name},
    )
    print(json.dumps({"out": str(args.out), "arch": info.arch, "fingerprint": info.fingerprint, "init": source}))
    return 0


def cmd_demo(args) -> int:
    from training import engine, recipes
    from training.data import load_reid_data
    from training.synth import generate_dataset

    if args.identities < 4:
        raise CliError("demo: --identities must be at least 4 (half train, half test)")
    out = Path(args.out)
    data_dir = out / "data"
    if (data_dir / "bounding_box_train").is_dir() and any((data_dir / "bounding_box_train").iterdir()):
        print(f"using the synthetic data already in {data_dir}", file=sys.stderr)
    else:
        print(f"rendering {args.identities} synthetic identities into {data_dir}", file=sys.stderr)
        generate_dataset(data_dir, identities=args.identities, seed=args.seed, progress=not args.quiet)
    data = load_reid_data(data_dir)
    recipe = recipes.get_recipe("demo")
    # A tiny demo set may have fewer identities than a batch wants: take them all.
    recipe = recipes.override(recipe, epochs=args.epochs, seed=args.seed, batch_p=min(recipe.batch_p, data.num_train_ids))
    _check_recipe(recipe)
    print(f"training the demo HA-CNN on {json.dumps(data.counts())}", file=sys.stderr)
    opts = engine.RunOptions(out=str(out / "model.safetensors"), device=args.device, eval_at_start=True, progress=not args.quiet)
    summary = engine.train(recipe, data, opts)
    before, after = summary["untrained"], summary["best"]
    print(
        f"held-out synthetic identities: untrained mAP {before['mAP']:.3f} rank-1 {before['rank1']:.3f} -> "
        f"trained mAP {after['mAP']:.3f} rank-1 {after['rank1']:.3f} "
        f"({summary['train_time_s']:.0f} s training); checkpoint {opts.out}",
        file=sys.stderr,
    )
    if summary.get("calibration"):
        c = summary["calibration"]
        print(f"match threshold {c['threshold']:.4f} at FAR {c['far']:g} (TAR {c['tar']:.3f}), stored in the checkpoint", file=sys.stderr)
    print(json.dumps({
        "out": opts.out, "data": str(data_dir), "untrained": before, "trained": after,
        "train_time_s": summary["train_time_s"], "calibration": summary.get("calibration"),
    }))
    return 0


def _load_for_scoring(args):
    """(model, info, test data, device) for the commands that score a checkpoint on query/gallery."""
    from models import load_checkpoint
    from training.data import load_reid_data
    from training.engine import resolve_device

    if args.batch_size < 1:
        raise CliError("--batch-size must be at least 1")
    device = resolve_device(args.device)
    model, info = load_checkpoint(args.checkpoint, device)
    data = load_reid_data(args.data, with_train=False)
    return model, info, data, device


def cmd_calibrate(args) -> int:
    from models.progress import progress

    from models.checkpoint import read_checkpoint_info
    from training.calibration import calibrate_checkpoint, summary
    from training.data import load_reid_data
    from training.engine import resolve_device

    if not 0 < args.far < 1:
        raise CliError(f"--far must be between 0 and 1 (exclusive), got {args.far}")
    if args.batch_size < 1:
        raise CliError("--batch-size must be at least 1")
    before = read_checkpoint_info(args.checkpoint)  # a bad checkpoint fails before any embedding
    data = load_reid_data(args.data, with_train=False)
    with progress(total=len(data.query) + len(data.gallery), desc="embed", unit="img") as bar:
        calibration = calibrate_checkpoint(
            args.checkpoint, data, far=args.far, out=args.out, device=resolve_device(args.device),
            batch_size=args.batch_size, workers=args.workers, progress=bar,
        )
    out = args.out or args.checkpoint
    print(
        f"{out}: threshold {calibration['threshold']:.4f} at FAR {args.far:g} (TAR {calibration['tar']:.3f}) from "
        f"{calibration['genuine_pairs']} same-person and {calibration['impostor_pairs']} different-people pairs; "
        f"weights and fingerprint {before.short_fingerprint} unchanged",
        file=sys.stderr,
    )
    print(json.dumps({"out": str(out), "fingerprint": before.fingerprint, **summary(calibration)}))
    return 0


def cmd_openset(args) -> int:
    import numpy as np
    from models.progress import progress

    from training.embeddings import query_gallery_similarity, query_gallery_labels
    from training.openset import average_reports, choose_enrolled, open_set_report, watchlist_scores

    if not 0 < args.enroll_fraction < 1:
        raise CliError(f"--enroll-fraction must be between 0 and 1 (exclusive), got {args.enroll_fraction}")
    if args.repeats < 1:
        raise CliError("--repeats must be at least 1")
    model, info, data, device = _load_for_scoring(args)
    threshold, source = (args.threshold, "option") if args.threshold is not None else (info.match_threshold, "checkpoint")
    if threshold is None:
        print("the checkpoint is not calibrated and no --threshold given: DIR@FAR only", file=sys.stderr)
        source = None
    with progress(total=len(data.query) + len(data.gallery), desc="embed", unit="img") as bar:
        similarity = query_gallery_similarity(model, data, info.mean, info.std, device, args.batch_size, args.workers, bar)
    q_pids, g_pids, q_cams, g_cams = query_gallery_labels(data)
    rng = np.random.default_rng(args.seed)
    reports = []
    for _ in range(args.repeats):
        enrolled = choose_enrolled(np.concatenate([q_pids, g_pids]), args.enroll_fraction, rng)
        scores = watchlist_scores(similarity, q_pids, g_pids, q_cams, g_cams, enrolled)
        reports.append(open_set_report(scores, threshold))
    test_ids = len((set(q_pids.tolist()) | set(g_pids.tolist())) - {0})
    result = {
        "model": info.model_name, "data": str(data.root), "test_identities": test_ids,
        "enrolled_identities": len(enrolled), "repeats": args.repeats, "seed": args.seed,
        "threshold": threshold, "threshold_source": source, **average_reports(reports),
    }
    print(json.dumps(result))
    return 0


def cmd_ablate(args) -> int:
    from training import ablation

    try:
        seeds = None if args.seeds is None else [int(v) for v in args.seeds.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if seeds is not None and not seeds:
        raise CliError("--seeds names no seed")
    config = ablation.CONFIGS[args.config]
    ablation.select_variants(config, args.only)  # an unknown name fails before any rendering
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    if args.rescore:
        ablation.rescore_refinement(args.out, config, device=args.device, say=say)
    records = ablation.run_ablation(
        args.out, config, seeds, args.only, device=args.device, progress=not args.quiet, say=say, precision=args.precision,
    )
    variants = ablation.select_variants(config, args.only)
    starts = dict.fromkeys(ablation.untrained_name(v.arch) for v in variants)
    order = [*starts, *(v.name for v in variants)]
    table, files = ablation.write_summary(args.out, config, records, order)
    print(f"wrote {', '.join(map(str, files))}", file=sys.stderr)
    print(table, end="")
    return 0


COMMANDS = {
    "synth": cmd_synth, "train": cmd_train, "eval": cmd_eval, "init": cmd_init, "demo": cmd_demo,
    "calibrate": cmd_calibrate, "openset": cmd_openset, "ablate": cmd_ablate,
}


def main(argv: list[str] | None = None) -> int:
    from models import CheckpointError
    from training.data import DataLayoutError
    from training.engine import TrainingError

    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except (CliError, DataLayoutError, CheckpointError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
