"""Fashion-MNIST loading and the shipped FashionResNet checkpoint."""

from __future__ import annotations

import pytest
import torch

from grailc.fashion_mnist import accuracy, load_fashion_mnist, to_inputs
from grailc.models.fashion_resnet import CHECKPOINT, FashionResNet, load_pretrained


@pytest.mark.parametrize(("split", "count"), [("train", 60000), ("test", 10000)])
def test_dataset_shapes_and_classes(split, count):
    images, labels = load_fashion_mnist(split)
    assert images.shape == (count, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (count,) and labels.dtype == torch.int64
    assert labels.unique().tolist() == list(range(10))


def test_inputs_are_normalised():
    images, _ = load_fashion_mnist("train")
    inputs = to_inputs(images[:10000])
    assert inputs.shape == (10000, 1, 28, 28) and inputs.dtype == torch.float32
    assert abs(inputs.mean().item()) < 0.05 and abs(inputs.std().item() - 1) < 0.05


def test_output_shape():
    model = FashionResNet().eval()
    with torch.no_grad():
        assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_checkpoint_accuracy():
    assert CHECKPOINT.is_file(), "run `python examples/train_fashion_mnist.py`"
    model = load_pretrained()
    assert not model.training
    images, labels = load_fashion_mnist("test")
    assert accuracy(model, images[:2000], labels[:2000]) >= 0.88
