"""Shared fixtures."""

import pytest
import torch
from torch import nn

from models import build_model


def _as_if_trained(model: nn.Module, seed: int) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics and HA-CNN's hard attention non-zero weights.

    A freshly built network has identity BatchNorms and image-independent crops, which would
    let a broken export or checkpoint path pass unnoticed.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            elif name.endswith(".hard") and isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.05)
    return model


@pytest.fixture
def trained_like():
    """``trained_like(arch, seed=0, **config)`` -> an eval-mode model with trained-looking weights."""

    def make(arch: str, seed: int = 0, **config) -> nn.Module:
        torch.manual_seed(seed)
        return _as_if_trained(build_model(arch, **config), seed).eval()

    return make


@pytest.fixture(scope="session")
def postgres():
    """A throw-away PostgreSQL cluster for the whole run (tests/pg_support.py); each test that
    uses it makes a database of its own with ``postgres.create_database()``."""
    from tests.pg_support import PostgresCluster

    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def served_checkpoint(tmp_path_factory):
    """(checkpoint, folder with its ONNX export): a service started on a data dir seeded from
    the folder (tests.service_support.seed_onnx_cache) skips exporting the model again."""
    from service.embedder import load_embedder
    from tests.service_support import make_checkpoint

    tmp = tmp_path_factory.mktemp("served-checkpoint")
    checkpoint = make_checkpoint(tmp / "model.safetensors")
    load_embedder(checkpoint, device="cpu", backend="onnx", data_dir=tmp / "template")
    return checkpoint, tmp / "template"
