"""Market-1501-layout data (DukeMTMC-reID uses the same): file lists, ids, cached images.

Layout: ``bounding_box_train/``, ``bounding_box_test/`` (the gallery), ``query/``; file
names start ``PPPP_cC`` (person id, camera). Person id -1 is junk, 0 a distractor.
Training drops both and relabels the rest 0..n-1; the gallery drops -1 and keeps 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.market1501 import IMAGE_SUFFIXES, JUNK_PID, is_identity, parse_name
from models.preprocess import resize_normalize

TRAIN_DIR, GALLERY_DIR, QUERY_DIR = "bounding_box_train", "bounding_box_test", "query"


class DataLayoutError(ValueError):
    """The folder is not in the Market-1501 layout; the message names the folder and what is wrong."""


@dataclass(frozen=True)
class Sample:
    path: str
    pid: int  # for training samples: the relabelled 0..n-1 id
    camid: int


@dataclass
class ReIDData:
    root: str
    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]
    num_train_ids: int

    def counts(self) -> dict:
        def ids(samples):
            return len({s.pid for s in samples})

        return {
            "train_images": len(self.train),
            "train_ids": self.num_train_ids,
            "query_images": len(self.query),
            "query_ids": ids(self.query),
            "gallery_images": len(self.gallery),
            "gallery_ids": ids(self.gallery),
        }


def scan_folder(folder: Path) -> list[tuple[str, int, int]]:
    """(path, pid, camid) for every parsable image in ``folder``, sorted by file name."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        parsed = parse_name(p.name)
        if parsed is not None:
            out.append((str(p), *parsed))
    return out


def _check_root(root: Path, subdirs: tuple[str, ...]) -> None:
    if not root.is_dir():
        raise DataLayoutError(f"{root}: no such data folder")
    missing = [d for d in subdirs if not (root / d).is_dir()]
    if missing:
        raise DataLayoutError(
            f"{root}: not a Market-1501-layout folder (missing {', '.join(d + '/' for d in missing)}; "
            f"expected {', '.join(d + '/' for d in subdirs)})"
        )


def _scan_nonempty(root: Path, sub: str) -> list[tuple[str, int, int]]:
    entries = scan_folder(root / sub)
    if not entries:
        raise DataLayoutError(f"{root / sub}: no images named like PPPP_cC..., e.g. 0002_c1s1_000451_03.jpg")
    return entries


def load_reid_data(root: str | Path, with_train: bool = True) -> ReIDData:
    """Read a Market-1501-layout folder; ``with_train=False`` needs only query/ and bounding_box_test/."""
    root = Path(root)
    _check_root(root, (TRAIN_DIR, QUERY_DIR, GALLERY_DIR) if with_train else (QUERY_DIR, GALLERY_DIR))
    train: list[Sample] = []
    num_ids = 0
    if with_train:
        raw = [e for e in _scan_nonempty(root, TRAIN_DIR) if is_identity(e[1])]
        if not raw:
            raise DataLayoutError(f"{root / TRAIN_DIR}: only junk (-1) and distractor (0) images, nothing to train on")
        relabel = {pid: i for i, pid in enumerate(sorted({pid for _, pid, _ in raw}))}
        train = [Sample(path, relabel[pid], cam) for path, pid, cam in raw]
        num_ids = len(relabel)
    query = [Sample(*e) for e in _scan_nonempty(root, QUERY_DIR) if e[1] != JUNK_PID]
    gallery = [Sample(*e) for e in _scan_nonempty(root, GALLERY_DIR) if e[1] != JUNK_PID]
    if not query or not gallery:
        raise DataLayoutError(f"{root}: query/ or bounding_box_test/ holds only junk (-1) images")
    return ReIDData(str(root), train, query, gallery, num_ids)


def load_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def load_resized(path: str, input_size: tuple[int, int]) -> np.ndarray:
    """H x W x 3 uint8 at the network's input size, resized as models.preprocess does (bilinear)."""
    height, width = input_size
    image = load_rgb(path)
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


class TrainImages(torch.utils.data.Dataset):
    """Training samples -> (augmented tensor, label). Images are decoded and resized once, then kept.

    With ``preload`` the whole set is decoded up front in the parent process, so DataLoader
    workers forked afterwards share the decoded pixels instead of each decoding them again.
    """

    def __init__(self, samples: list[Sample], input_size: tuple[int, int], transform, preload: bool = True):
        self.samples = samples
        self.input_size = tuple(input_size)
        self.transform = transform
        self.labels = [s.pid for s in samples]
        self._pixels: list[np.ndarray | None] = [None] * len(samples)
        if preload:
            for i in range(len(samples)):
                self._pixels[i] = load_resized(samples[i].path, self.input_size)

    def __len__(self) -> int:
        return len(self.samples)

    def pixels(self, index: int) -> np.ndarray:
        if self._pixels[index] is None:
            self._pixels[index] = load_resized(self.samples[index].path, self.input_size)
        return self._pixels[index]

    def __getitem__(self, index: int):
        return self.transform(self.pixels(index)), self.labels[index]


class EvalImages(torch.utils.data.Dataset):
    """Query/gallery samples -> the exact tensor the service would compute (models.preprocess)."""

    def __init__(self, samples: list[Sample], input_size, mean, std):
        self.samples = samples
        self.input_size = tuple(input_size)
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> torch.Tensor:
        return resize_normalize(load_rgb(self.samples[index].path), self.input_size, self.mean, self.std)
