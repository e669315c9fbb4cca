"""Tests for the model zoo of ``curveball_experiments.models``."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from curveball_experiments import models


def _has(module: nn.Module, kind: type[nn.Module]) -> bool:
    return any(isinstance(m, kind) for m in module.modules())


def test_mlp_shapes() -> None:
    net = models.mlp()
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    net = models.mlp(in_features=12, hidden=(7,), num_classes=4)
    assert net(torch.randn(5, 12)).shape == (5, 4)
    linear = models.mlp(in_features=12, hidden=(), num_classes=4)
    assert sum(isinstance(m, nn.Linear) for m in linear.modules()) == 1
    with pytest.raises(ValueError, match="activation"):
        models.mlp(activation="gelu")


def test_paper_mnist_mlp_layout() -> None:
    net = models.mnist_mlp()
    widths = [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, nn.Linear)]
    assert widths == [(784, 128), (128, 64), (64, 32), (32, 10)]
    assert sum(isinstance(m, nn.Tanh) for m in net.modules()) == 3
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_basic_cnn(batch_norm: bool) -> None:
    net = models.basic_cnn(batch_norm=batch_norm)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert _has(net, nn.BatchNorm2d) == batch_norm
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert n_bn == (4 if batch_norm else 0)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 10]
    assert [c.kernel_size for c in convs] == [(5, 5), (5, 5), (5, 5), (4, 4), (1, 1)]


def test_basic_cnn_options() -> None:
    net = models.basic_cnn(num_classes=7, in_channels=1)
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_resnet18() -> None:
    net = models.resnet18()
    assert models.count_parameters(net) == 11_173_962
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert models.resnet18(num_classes=100, in_channels=1)(torch.randn(2, 1, 16, 16)).shape == (
        2,
        100,
    )


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vggf_small_input(batch_norm: bool) -> None:
    net = models.vggf(num_classes=5, batch_norm=batch_norm)
    assert _has(net, nn.BatchNorm2d) == batch_norm
    assert _has(net, nn.LocalResponseNorm) != batch_norm
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_vggf_feature_map_is_6x6_at_224() -> None:
    features = models.vggf()[0]
    with torch.no_grad():
        assert features(torch.randn(1, 3, 224, 224)).shape == (1, 256, 6, 6)


def test_random_architecture_deterministic() -> None:
    _, d1 = models.random_architecture(123)
    _, d2 = models.random_architecture(123)
    assert d1 == d2
    m1, _ = models.random_architecture(5)
    m2, _ = models.random_architecture(5)
    assert str(m1) == str(m2)
    descriptions = {json.dumps(models.random_architecture(s)[1], sort_keys=True) for s in range(10)}
    assert len(descriptions) > 1


@pytest.mark.parametrize("seed", range(8))
def test_random_architecture_runs(seed: int) -> None:
    model, desc = models.random_architecture(seed, in_shape=(3, 8, 8), num_classes=4)
    json.dumps(desc)
    assert desc["seed"] == seed
    assert desc["kind"] in {"cnn", "mlp"}
    assert desc["activation"] in models.ACTIVATIONS
    assert all(w in (8, 16, 32, 64) for w in desc["widths"])
    assert 1 <= desc["depth"] <= (4 if desc["kind"] == "cnn" else 3)
    assert desc["num_parameters"] == models.count_parameters(model)
    out = model(torch.randn(3, 3, 8, 8))
    assert out.shape == (3, 4)
    assert torch.isfinite(out).all()


def test_random_architecture_leaves_global_rng_alone() -> None:
    import random

    random.seed(0)
    expected = random.random()
    random.seed(0)
    models.random_architecture(42)
    assert random.random() == expected
