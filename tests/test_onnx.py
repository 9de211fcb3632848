"""ONNX export: ONNX Runtime gives the torch embeddings, at any batch size."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models import embed
from models.export import export_onnx


@pytest.mark.parametrize(
    "arch, config",
    [
        ("hacnn", {}),
        # Same network as at 256x128; a small input keeps export and inference quick.
        ("resnet50", {"input_size": (64, 32)}),
    ],
)
def test_onnx_runtime_matches_torch_at_other_batch_sizes(tmp_path, trained_like, arch, config):
    model = trained_like(arch, seed=2, **config)
    path = tmp_path / f"{arch}.onnx"
    export_onnx(model, path)  # traced with a batch of 2

    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["embeddings"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(3)
    for batch in (5, 1):
        images = torch.randn(batch, 3, *model.input_size, generator=g)
        (onnx_out,) = session.run(["embeddings"], {"images": images.numpy()})
        torch_out = embed(model, images).numpy()
        assert onnx_out.shape == (batch, model.embedding_dim)
        np.testing.assert_allclose(onnx_out, torch_out, atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.linalg.norm(onnx_out, axis=1), 1.0, atol=1e-5)
