"""Training images/s on this CPU: fp32 vs bf16 autocast, each with and without channels-last.

    flock /tmp/reid-cpu.lock python bench/bench_training.py [--archs hacnn resnet50] [--batch 32] [--steps 2]
                                                            [--input-size H W]

Each configuration runs full training steps (forward with the recipe's losses, backward,
Adam step) of the recipe's network at its input size (HA-CNN 160x64, ResNet-50 256x128, last
stride 1; ``--input-size`` for another size) on random images: one untimed step, then ``--steps`` timed ones. bf16 is forced
even where the CPU has no native bf16 (it runs emulated there), so that the table shows
what ``--precision bf16`` would cost. Prints one line per configuration and a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from models import list_models
from models.hardware import cpu_info
from training.engine import TrainingNet, build_network, make_optimizer
from training.precision import autocast
from training.recipes import override, recipe_for

CLASSES = 60


def images_per_s(arch: str, precision: str, channels_last: bool, batch: int, steps: int,
                 input_size: tuple[int, int] | None = None) -> float:
    recipe = recipe_for(arch)
    if input_size is not None:
        recipe = override(recipe, input_size=input_size)
    torch.manual_seed(0)
    net = TrainingNet(build_network(recipe, CLASSES), recipe, CLASSES).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    opt = make_optimizer(recipe, net.parameters())
    h, w = recipe.input_size
    images = torch.randn(batch, 3, h, w).contiguous(memory_format=fmt)
    labels = torch.arange(batch) // recipe.batch_k % CLASSES

    def step() -> None:
        with autocast(precision, "cpu"):
            total, _ = net(images, labels)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    step()  # untimed: allocations, oneDNN kernel choice
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=list_models(), choices=list_models())
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="instead of each recipe's own")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*bf16.*")
    print(f"CPU: {cpu_info().summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"batch {args.batch}, {args.steps} timed steps", flush=True)
    rows = []
    for arch in args.archs:
        for precision in ("fp32", "bf16"):
            for channels_last in (False, True):
                ips = images_per_s(arch, precision, channels_last, args.batch, args.steps, args.input_size)
                rows.append((arch, precision, channels_last, ips))
                print(f"{arch} {precision} channels_last={channels_last}: {ips:.1f} img/s", flush=True)
    print("\n| network (input) | fp32 | fp32 channels-last | bf16 | bf16 channels-last |\n|---|---|---|---|---|")
    for arch in args.archs:
        size = "x".join(map(str, args.input_size or recipe_for(arch).input_size))
        got = {(r[1], r[2]): r[3] for r in rows if r[0] == arch}
        base = got[("fp32", False)]
        cells = [f"{got[k]:.1f} ({got[k] / base:.2f}x)" for k in [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]]
        print(f"| {arch} ({size}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
