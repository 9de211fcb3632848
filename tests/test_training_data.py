"""Market-1501 loader, P x K sampler and training augmentation."""

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from models import IMAGENET_MEAN, IMAGENET_STD
from models.preprocess import resize_normalize
from training.data import DataLayoutError, EvalImages, TrainImages, load_reid_data, parse_name
from training.sampler import PKBatchSampler
from training.transforms import TrainTransform, random_erase

TRAIN = ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0007_c1s2_000101_01.jpg",
         "0000_c3s1_000001_01.jpg", "-1_c1s1_000002_01.jpg", "Thumbs.db", "readme.jpg"]
QUERY = ["0003_c1s1_000001_00.jpg", "-1_c2s1_000003_00.jpg"]
GALLERY = ["0003_c2s1_000010_01.jpg", "0000_c4s1_000011_01.jpg", "-1_c5s1_000012_01.jpg", "0009_c6s1_000013_01.jpg"]


def _write(folder, names):
    folder.mkdir(parents=True)
    for i, name in enumerate(names):
        if name.endswith(".jpg"):
            Image.new("RGB", (64, 128), (10 * i, 80, 160)).save(folder / name)
        else:
            (folder / name).write_text("not an image")


@pytest.fixture()
def market(tmp_path):
    _write(tmp_path / "bounding_box_train", TRAIN)
    _write(tmp_path / "query", QUERY)
    _write(tmp_path / "bounding_box_test", GALLERY)
    return tmp_path


def test_names_of_market_and_duke_parse():
    assert parse_name("0002_c1s1_000451_03.jpg") == (2, 1)
    assert parse_name("-1_c3s2_000001_01.jpg") == (-1, 3)
    assert parse_name("0005_c2_f0046182.jpg") == (5, 2)  # DukeMTMC-reID
    assert parse_name("readme.jpg") is None


def test_training_drops_junk_and_distractors_and_relabels(market):
    data = load_reid_data(market)
    assert data.num_train_ids == 2
    assert len(data.train) == 3
    assert sorted(s.pid for s in data.train) == [0, 0, 1]  # 2 -> 0, 7 -> 1
    assert {s.camid for s in data.train} == {1, 2}


def test_gallery_keeps_distractors_but_not_junk(market):
    data = load_reid_data(market)
    assert sorted(s.pid for s in data.gallery) == [0, 3, 9]
    assert [s.pid for s in data.query] == [3]


def test_missing_subfolder_is_named(market):
    (market / "query" / QUERY[0]).unlink()
    (market / "query" / QUERY[1]).unlink()
    (market / "query").rmdir()
    with pytest.raises(DataLayoutError, match="query/"):
        load_reid_data(market)


def test_folder_without_parsable_images_is_refused(tmp_path):
    _write(tmp_path / "bounding_box_train", ["a.jpg"])
    _write(tmp_path / "query", ["b.jpg"])
    _write(tmp_path / "bounding_box_test", ["c.jpg"])
    with pytest.raises(DataLayoutError, match="no images named like"):
        load_reid_data(tmp_path)


def test_missing_root_is_refused(tmp_path):
    with pytest.raises(DataLayoutError, match="no such data folder"):
        load_reid_data(tmp_path / "nope")


def test_eval_images_are_exactly_the_service_preprocessing(market):
    data = load_reid_data(market)
    ds = EvalImages(data.gallery, (160, 64), IMAGENET_MEAN, IMAGENET_STD)
    with Image.open(data.gallery[0].path) as im:
        expected = resize_normalize(im, (160, 64), IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(ds[0], expected)


def test_unaugmented_train_transform_matches_eval_preprocessing(market):
    data = load_reid_data(market)
    plain = TrainTransform(IMAGENET_MEAN, IMAGENET_STD, flip_p=0.0, pad=0, erase_p=0.0)
    ds = TrainImages(data.train, (160, 64), plain)
    x, label = ds[0]
    with Image.open(data.train[0].path) as im:
        assert torch.allclose(x, resize_normalize(im, (160, 64), IMAGENET_MEAN, IMAGENET_STD))
    assert label == data.train[0].pid


def test_augmented_train_images_keep_the_input_size(market):
    data = load_reid_data(market)
    ds = TrainImages(data.train, (96, 48), TrainTransform(IMAGENET_MEAN, IMAGENET_STD, erase_p=1.0))
    assert ds[1][0].shape == (3, 96, 48)


def test_random_erase_blanks_one_rectangle():
    torch.manual_seed(0)
    x = random_erase(torch.ones(3, 64, 32), p=1.0, value=0.0)
    rows, cols = np.nonzero((x[0] == 0).numpy())
    assert len(rows) > 0
    # the erased pixels fill their bounding box exactly: one rectangle, same on every channel
    assert len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert torch.equal(x[0] == 0, x[2] == 0)


def test_pk_sampler_gives_p_identities_with_k_images_each():
    labels = [i // 5 for i in range(50)] + [10, 11]  # ids 10 and 11 have one image each
    sampler = PKBatchSampler(labels, p=4, k=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 52 // 12
    seen = set()
    for batch in batches:
        assert len(batch) == 12
        counts = Counter(labels[i] for i in batch)
        assert len(counts) == 4 and set(counts.values()) == {3}
        seen |= set(counts)
        # the K images of an identity are adjacent (the MGAT mask's floor(i/K) rule relies on it)
        assert [labels[i] for i in batch] == [labels[batch[j * 3]] for j in range(4) for _ in range(3)]
    assert len(seen) >= 12


def test_pk_sampler_samples_small_identities_with_replacement():
    labels = [0, 1, 1, 1, 1]
    batch = next(iter(PKBatchSampler(labels, p=2, k=4, seed=0)))
    assert Counter(labels[i] for i in batch) == {0: 4, 1: 4}
    assert batch.count(0) == 4


def test_pk_sampler_is_reproducible_per_epoch_and_changes_between_epochs():
    labels = [i // 4 for i in range(80)]
    a, b = PKBatchSampler(labels, 4, 4, seed=3), PKBatchSampler(labels, 4, 4, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first


def test_pk_sampler_refuses_more_identities_than_exist():
    with pytest.raises(ValueError, match="only 2"):
        PKBatchSampler([0, 0, 1, 1], p=3, k=2)
