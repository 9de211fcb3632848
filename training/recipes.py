"""Training recipes: named sets of defaults, each overridable from the command line.

    hacnn           HA-CNN from scratch, 160x64, cross-entropy (label smoothing) on both branches
    hacnn-mgat      the same + MGAT identity loss + optimisation-feedback loss
    resnet50        "bag of tricks" baseline: last stride 1, BNNeck, warm-up, label smoothing,
                    random erasing, cross-entropy + batch-hard triplet, Adam 3.5e-4
    resnet50-mgat   the baseline + MGAT identity loss + optimisation-feedback loss
    demo            a narrow HA-CNN for the synthetic demo: minutes on two CPU cores

See docs/training.md for why each value is what it is.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from models import list_models


@dataclass
class Recipe:
    name: str
    arch: str
    model_config: dict = field(default_factory=dict)  # build_model kwargs (input_size is added from below)
    input_size: tuple[int, int] = (256, 128)
    epochs: int = 120
    batch_p: int = 16
    batch_k: int = 4
    optimizer: str = "adam"  # adam | sgd
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    momentum: float = 0.9  # sgd only
    warmup_epochs: int = 10  # the longest warm-up (linear from lr * warmup_factor to lr) ...
    warmup_fraction: float = 0.1  # ... which lasts this fraction of the run when that is shorter
    warmup_factor: float = 0.1
    lr_steps: tuple[float, ...] = (1 / 3, 7 / 12)  # as fractions of the epochs: multiply lr by lr_decay there
    lr_decay: float = 0.1
    first_step_epoch: int = 0  # no lr step before this epoch: a run shorter than it keeps the full rate
    label_smoothing: float = 0.1
    triplet_weight: float = 1.0  # 0 turns the triplet loss off
    margin: float = 0.3
    soft_margin: bool = False
    mgat: bool = False
    mgat_gamma: float = 1.0
    mgat_weight: float = 1.0  # weight of MGAT's identity loss
    of_weight: float = 1.0  # weight of the optimisation-feedback loss
    of_detach: bool = True  # OF loss pulls the CNN towards X' only (False: X' towards the CNN too)
    mgat_learnable_w: bool = True  # MGAT's projection W (identity-initialised) is trained; False: no W
    flip_p: float = 0.5
    pad: int = 10
    erase_p: float = 0.5
    eval_every: int = 10
    channels_last: bool = False  # NHWC activations: measured faster for ResNet-50 only (docs/training.md)
    seed: int = 0

    def warmup(self) -> int:
        """Epochs of warm-up in this run: ``warmup_fraction`` of it (rounded down), at most
        ``warmup_epochs``, so that a short run is not all warm-up (3 epochs: none)."""
        return max(0, min(self.warmup_epochs, math.floor(self.warmup_fraction * self.epochs + 1e-9)))

    def lr_step_epochs(self) -> list[int]:
        """Epochs (0-based) from which the lr is multiplied by lr_decay once more: the fractions
        of the run, none inside the warm-up nor before ``first_step_epoch``, so that a short run
        trains at the full rate (a network far from converged only slows down at a lower rate)."""
        steps = {round(f * self.epochs) for f in self.lr_steps if 0 < f < 1}
        return sorted(s for s in steps if self.warmup() < s < self.epochs and s >= self.first_step_epoch)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        d["lr_steps"] = list(self.lr_steps)
        d["warmup"] = self.warmup()
        d["lr_step_epochs"] = self.lr_step_epochs()
        return d


def _hacnn() -> Recipe:
    # The paper trains from scratch with SGD; Adam at 3e-4 reaches a good model in fewer epochs
    # from scratch and needs no per-dataset lr search (`--optimizer sgd --lr 0.05` for the paper's style).
    # Measured on a short budget (docs/training.md, "Recipes on a short budget"): cross-entropy
    # only, so batches of 32 different identities (K = 1), since P x K batches of 8 identities
    # learn about half as fast per epoch; no lr step before epoch 20, since a step inside an
    # 8-epoch run stalls a network still far from converged. Warm-up: 10% of the run, at most 5 epochs.
    return Recipe(
        name="hacnn",
        arch="hacnn",
        input_size=(160, 64),
        epochs=150,
        batch_p=32,
        batch_k=1,
        lr=3e-4,
        warmup_epochs=5,
        lr_steps=(2 / 3, 5 / 6),
        first_step_epoch=20,
        triplet_weight=0.0,
        pad=0,  # flip only: pad 10 + crop cost 0.03 mAP in 8 epochs; `--pad 10` for long runs
        erase_p=0.0,
    )


def _hacnn_mgat() -> Recipe:
    # MGAT's graph needs several images of each identity in a batch: P x K = 8 x 4.
    return dataclasses.replace(_hacnn(), name="hacnn-mgat", mgat=True, batch_p=8, batch_k=4)


def _resnet50() -> Recipe:
    return Recipe(
        name="resnet50", arch="resnet50", model_config={"last_stride": 1}, input_size=(256, 128), channels_last=True
    )


def _resnet50_mgat() -> Recipe:
    return dataclasses.replace(_resnet50(), name="resnet50-mgat", mgat=True)


def _demo() -> Recipe:
    # Narrow HA-CNN (about 0.8M parameters, ~3x faster than the paper's widths on a CPU), short
    # schedule; the synthetic crops are 128x64, so no upscaling to 160x64 either.
    return Recipe(
        name="demo",
        arch="hacnn",
        model_config={"widths": [64, 128, 192], "feature_dim": 256},
        input_size=(128, 64),
        epochs=8,
        batch_p=8,
        batch_k=4,
        lr=1e-3,
        warmup_epochs=1,
        warmup_fraction=0.125,  # 1 epoch of 8 at lr 1e-3; none in a run of 7 or fewer
        lr_steps=(0.75,),
        triplet_weight=1.0,
        pad=6,
        erase_p=0.3,
        eval_every=0,
    )


# Every architecture of the model zoo has a recipe named after it and one named "<arch>-mgat".
RECIPES = {
    "hacnn": _hacnn,
    "hacnn-mgat": _hacnn_mgat,
    "resnet50": _resnet50,
    "resnet50-mgat": _resnet50_mgat,
    "demo": _demo,
}


def recipe_for(arch: str, mgat: bool = False) -> Recipe:
    """The default recipe for ``--arch`` and ``--mgat``."""
    if arch not in list_models():
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(list_models())}")
    return get_recipe(f"{arch}-mgat" if mgat else arch)


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]()
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}") from None


def override(recipe: Recipe, **changes) -> Recipe:
    """A copy with every non-None change applied (the command line's explicit options)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    unknown = set(changes) - {f.name for f in dataclasses.fields(Recipe)}
    if unknown:
        raise ValueError(f"unknown recipe fields: {', '.join(sorted(unknown))}")
    if "input_size" in changes:
        changes["input_size"] = tuple(int(v) for v in changes["input_size"])
    return dataclasses.replace(recipe, **changes)
