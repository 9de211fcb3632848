"""The plain training loop issue 14 compares the `hacnn` recipe with: HA-CNN (paper widths,
160x64), Adam 3e-4 constant, cross-entropy with label smoothing 0.1 on both branches, random
flip only, shuffled batches of 32 (not P x K), no warm-up, no lr steps.

    python bench/plain_loop.py --data DIR [--epochs 8] [--seed 0] [--weight-decay 5e-4]

Prints one JSON line: the held-out rank-1/mAP after the last epoch and the training time.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
import torch

from models import IMAGENET_MEAN, IMAGENET_STD, build_model
from training.data import TrainImages, load_reid_data
from training.embeddings import evaluate_model
from training.losses import cross_entropy_smooth
from training.transforms import TrainTransform


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    data = load_reid_data(args.data)
    model = build_model("hacnn", num_classes=data.num_train_ids, input_size=[160, 64])
    images = TrainImages(data.train, (160, 64), TrainTransform(IMAGENET_MEAN, IMAGENET_STD, 0.5, 0, 0.0))
    loader = torch.utils.data.DataLoader(images, batch_size=args.batch_size, shuffle=True, drop_last=True)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    device = torch.device("cpu")
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        total, steps = 0.0, 0
        for x, y in loader:
            out = model(x)
            loss = sum(cross_entropy_smooth(lg, y, 0.1) for lg in out["logits"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        print(f"epoch {epoch + 1}/{args.epochs} loss {total / steps:.4f}", flush=True)
    train_s = time.time() - t0
    metrics, _ = evaluate_model(model, data, IMAGENET_MEAN, IMAGENET_STD, device)
    print(json.dumps({"run": "plain loop", "epochs": args.epochs, "rank1": round(metrics["rank1"], 3),
                      "mAP": round(metrics["mAP"], 3), "train_time_s": round(train_s, 1)}))


if __name__ == "__main__":
    main()
