"""The networks: embedding shapes and norms, training outputs, sizes, torchvision compatibility."""

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image

from models import IMAGENET_MEAN, IMAGENET_STD, build_model, embed
from models.preprocess import normalize_array, normalize_pixels, resize_normalize
from models.resnet import ResNet50ReID

FIXTURE = Path(__file__).parent / "fixtures" / "torchvision_resnet50_keys.txt"
RESNET_INPUT = (128, 64)  # fully convolutional: a smaller input than 256x128 keeps the tests quick


def torchvision_resnet50_shapes() -> dict[str, tuple[int, ...]]:
    """name -> shape of torchvision's resnet50().state_dict(), from the fixture file."""
    shapes = {}
    for line in FIXTURE.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split()
        shapes[name] = () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
    return shapes


def torchvision_like_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with torchvision resnet50's names and shapes (fc included), as a user's file would hold."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in torchvision_resnet50_shapes().items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(1000, dtype=torch.long)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        else:
            state[name] = torch.randn(shape, generator=g)
    return state


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- HA-CNN ---------------------------------------------------------------------------------


def test_hacnn_eval_gives_one_1024d_embedding_per_image_independent_of_the_batch(trained_like):
    model = trained_like("hacnn")
    x = torch.randn(3, 3, 160, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
        alone = model(x[:1])
    assert out.shape == (3, 1024) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0], alone[0], atol=1e-5), "an image's embedding must not depend on its batch"
    assert (out[0] - out[1]).abs().max() > 1e-3, "different images should give different embeddings"
    normed = embed(model, x)
    assert torch.allclose(normed.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(normed, F.normalize(out, dim=1), atol=1e-6)


def test_hacnn_train_mode_returns_both_branches_and_trains_the_hard_attention():
    torch.manual_seed(0)
    model = build_model("hacnn", num_classes=7).train()
    x = torch.randn(4, 3, 160, 64)
    out = model(x)
    assert set(out) == {"embedding", "features", "logits"}
    global_feature, local_feature = out["features"]
    assert global_feature.shape == local_feature.shape == (4, 512)
    assert torch.equal(out["embedding"], torch.cat([global_feature, local_feature], dim=1))
    assert [tuple(l.shape) for l in out["logits"]] == [(4, 7), (4, 7)]

    labels = torch.tensor([0, 1, 2, 3])
    sum(F.cross_entropy(l, labels) for l in out["logits"]).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # The crop translations are learnt through grid_sample: their FC must get a gradient.
    for stage in range(3):
        assert grads[f"attentions.{stage}.hard.weight"].abs().sum() > 0


def test_hacnn_serving_network_has_no_classifiers():
    model = build_model("hacnn").train()
    out = model(torch.randn(2, 3, 160, 64))
    assert "logits" not in out
    assert not any(name.startswith("classifier") for name, _ in model.named_parameters())


def test_hacnn_size_is_the_papers_and_classifiers_add_only_two_linear_layers():
    serving = n_params(build_model("hacnn"))
    # Paper: about 2.7M; ours is 2.92M (the SE reduction and fuse convs are the paper's; see docs/models.md).
    assert 2.6e6 < serving < 3.0e6
    with_classes = n_params(build_model("hacnn", num_classes=751))
    assert with_classes - serving == 2 * (512 * 751 + 751)


# --- ResNet-50 ------------------------------------------------------------------------------


def test_resnet50_eval_gives_2048d_bnneck_embedding(trained_like):
    model = trained_like("resnet50")
    x = torch.randn(3, 3, *RESNET_INPUT, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(x)
        alone = model(x[1:2])
    assert out.shape == (3, 2048) and torch.isfinite(out).all()
    assert torch.allclose(out[1], alone[0], atol=1e-4)
    assert torch.allclose(embed(model, x).norm(dim=1), torch.ones(3), atol=1e-5)


def test_resnet50_train_mode_gives_pre_bn_feature_for_triplet_and_logits_on_bn_output():
    torch.manual_seed(0)
    model = build_model("resnet50", num_classes=5).train()
    out = model(torch.randn(4, 3, *RESNET_INPUT))
    (feature,) = out["features"]
    assert feature.shape == out["embedding"].shape == (4, 2048)
    assert (feature >= 0).all(), "the pre-BN feature is an average of ReLU outputs"
    # BNNeck without shift: in training the BN output is centred per channel.
    assert out["embedding"].mean(dim=0).abs().max() < 1e-4
    (logits,) = out["logits"]
    assert logits.shape == (4, 5)
    assert torch.allclose(logits, model.classifier(out["embedding"]))


@pytest.mark.parametrize("last_stride, expected", [(1, (8, 4)), (2, (4, 2))])
def test_resnet50_last_stride_sets_the_final_feature_map_size(last_stride, expected):
    model = build_model("resnet50", last_stride=last_stride).eval()
    seen = {}
    model.layer4.register_forward_hook(lambda m, i, o: seen.update(shape=tuple(o.shape[2:])))
    with torch.no_grad():
        model(torch.zeros(1, 3, *RESNET_INPUT))
    assert seen["shape"] == expected


def test_resnet50_backbone_names_and_shapes_are_torchvisions():
    reference = {k: v for k, v in torchvision_resnet50_shapes().items() if not k.startswith("fc.")}
    assert len(reference) == 318  # sanity check of the fixture itself: 320 entries minus fc.weight/fc.bias
    model = build_model("resnet50")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in model.backbone_state_dict_keys()}
    assert ours == reference


def test_resnet50_backbone_has_torchvisions_23_5m_parameters():
    shapes = torchvision_resnet50_shapes()
    learnable = [
        s for k, s in shapes.items() if not k.startswith("fc.") and k.endswith((".weight", ".bias"))
    ]
    reference = sum(int(np.prod(s)) for s in learnable)
    model = build_model("resnet50")
    ours = sum(p.numel() for k, p in model.named_parameters() if not k.startswith(("bottleneck.", "classifier.")))
    assert ours == reference == 23_508_032


@pytest.mark.parametrize("fmt", ["torch.save", "safetensors"])
def test_torchvision_state_dict_file_loads_into_the_backbone(tmp_path, fmt):
    state = torchvision_like_state_dict()
    path = tmp_path / ("resnet50.pth" if fmt == "torch.save" else "resnet50.safetensors")
    if fmt == "torch.save":
        torch.save(state, path)
    else:
        safetensors.torch.save_file(state, str(path))
    model = build_model("resnet50")
    neck_before = {k: v.clone() for k, v in model.bottleneck.state_dict().items()}
    model.load_imagenet_weights(path)
    own = model.state_dict()
    for name, tensor in state.items():
        if not name.startswith("fc."):
            assert torch.equal(own[name], tensor), name
    # The head is ours, not ImageNet's: fc is dropped and the BNNeck left as built.
    assert not any(k.startswith("fc.") for k in own)
    for k, v in model.bottleneck.state_dict().items():
        assert torch.equal(v, neck_before[k])


def test_load_imagenet_state_dict_from_a_dict_ends_up_in_the_weights():
    state = torchvision_like_state_dict(seed=3)
    model = ResNet50ReID()
    model.load_imagenet_state_dict(state)
    assert torch.equal(model.layer3[5].conv2.weight, state["layer3.5.conv2.weight"])
    assert torch.equal(model.bn1.running_var, state["bn1.running_var"])


def test_wrong_imagenet_files_give_a_clear_error(tmp_path):
    model = build_model("resnet50")

    missing = tmp_path / "absent.pth"
    with pytest.raises(ValueError, match="absent.pth: no such file"):
        model.load_imagenet_weights(missing)

    garbage = tmp_path / "notes.txt"
    garbage.write_text("not a state dict")
    with pytest.raises(ValueError, match="neither a safetensors nor a torch.save"):
        model.load_imagenet_weights(garbage)

    # A resnet18-like file: basic blocks have no conv3, and there is no layer3.5 ...
    state = torchvision_like_state_dict()
    resnet18_like = {k: v for k, v in state.items() if ".conv3." not in k and ".bn3." not in k}
    path = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(resnet18_like, str(path))
    with pytest.raises(ValueError, match=r"resnet18.safetensors: not a torchvision resnet50 state dict: \d+ missing"):
        model.load_imagenet_weights(path)

    # Right names, wrong shape (e.g. a 3x3 stem).
    state["conv1.weight"] = torch.randn(64, 3, 3, 3)
    with pytest.raises(ValueError, match=r"shape mismatch for conv1.weight: file has \(64, 3, 3, 3\)"):
        model.load_imagenet_state_dict(state)

    # A pickled object that is not a bare state dict is refused, not unpickled.
    pickled = tmp_path / "model.pth"
    torch.save({"epoch": 3, "note": object()}, pickled)
    with pytest.raises(ValueError, match="model.pth: neither a safetensors nor a torch.save"):
        model.load_imagenet_weights(pickled)


# --- zoo and preprocessing --------------------------------------------------------------------


def test_build_model_rejects_unknown_arch_and_bad_config():
    with pytest.raises(ValueError, match="unknown architecture 'vgg16'; known: hacnn, resnet50"):
        build_model("vgg16")
    with pytest.raises(ValueError, match="bad config for hacnn"):
        build_model("hacnn", depth=50)


def test_embed_refuses_a_model_in_training_mode():
    with pytest.raises(RuntimeError, match="eval mode"):
        embed(build_model("hacnn").train(), torch.zeros(2, 3, 160, 64))


def test_resize_normalize_gives_the_network_input():
    image = Image.new("RGB", (40, 100), (255, 0, 128))  # any crop size, W x H
    x = resize_normalize(image, (160, 64), IMAGENET_MEAN, IMAGENET_STD)
    assert x.shape == (3, 160, 64) and x.dtype == torch.float32
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)
    # Greyscale and RGBA uploads are converted, not rejected.
    assert resize_normalize(Image.new("L", (64, 160)), (160, 64), IMAGENET_MEAN, IMAGENET_STD).shape == (3, 160, 64)
    assert resize_normalize(Image.new("RGBA", (64, 160)), (160, 64), IMAGENET_MEAN, IMAGENET_STD).shape == (3, 160, 64)


def test_normalising_a_batch_of_pixels_equals_normalising_each_image():
    """The service normalises whole batches of uint8 pixels; training normalises one image at a time."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 160, 64, 3), dtype=np.uint8)
    batch = normalize_pixels(pixels, IMAGENET_MEAN, IMAGENET_STD)
    assert batch.shape == (3, 3, 160, 64) and batch.dtype == np.float32
    for image, row in zip(pixels, batch):
        np.testing.assert_array_equal(row, normalize_array(image, IMAGENET_MEAN, IMAGENET_STD).numpy())
