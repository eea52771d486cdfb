"""Unit tests for ftmpi.models (no MPI)."""

from __future__ import annotations

import pytest
import torch

from ftmpi.models import PaperCNN, SyntheticMLP, count_parameters, mlp_parameter_count


def conv_params(cin: int, cout: int, k: int) -> int:
    return cout * cin * k * k + cout


def linear_params(fin: int, fout: int) -> int:
    return fout * fin + fout


def test_paper_cnn_output_shape() -> None:
    model = PaperCNN()
    model.eval()
    out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    assert out.dtype == torch.float32
    assert PaperCNN(num_classes=3)(torch.randn(2, 1, 28, 28)).shape == (2, 3)


def test_paper_cnn_parameter_count() -> None:
    expected = (
        conv_params(1, 16, 3)
        + conv_params(16, 32, 3)
        + linear_params(32 * 7 * 7, 512)
        + linear_params(512, 10)
    )
    assert expected == 813_258
    assert count_parameters(PaperCNN()) == expected


def test_paper_cnn_dropout_active_only_in_training() -> None:
    torch.manual_seed(0)
    model = PaperCNN()
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_paper_cnn_backward() -> None:
    model = PaperCNN()
    loss = torch.nn.functional.cross_entropy(
        model(torch.randn(3, 1, 28, 28)), torch.tensor([0, 1, 2])
    )
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("target", [1_000_000, 25_000_000])
def test_synthetic_mlp_within_five_percent(target: int) -> None:
    with torch.device("meta"):  # no memory allocated or initialised
        model = SyntheticMLP(target)
    actual = count_parameters(model)
    assert abs(actual - target) <= 0.05 * target
    assert actual == mlp_parameter_count(784, model.hidden_width, model.num_hidden_layers, 10)


def test_synthetic_mlp_forward_and_count() -> None:
    model = SyntheticMLP(1_000_000, in_features=784, num_classes=10)
    h = model.hidden_width
    expected = linear_params(784, h) + linear_params(h, h) + linear_params(h, 10)
    assert count_parameters(model) == expected
    assert abs(expected - 1_000_000) <= 0.05 * 1_000_000
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("layers", [1, 3])
def test_synthetic_mlp_depths(layers: int) -> None:
    with torch.device("meta"):
        model = SyntheticMLP(2_000_000, in_features=100, num_classes=7, num_hidden_layers=layers)
    assert abs(count_parameters(model) - 2_000_000) <= 0.05 * 2_000_000
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear) == layers + 1


def test_synthetic_mlp_rejects_unreachable_target() -> None:
    with pytest.raises(ValueError, match="smallest possible"):
        SyntheticMLP(100)
    with pytest.raises(ValueError, match="num_params_target must be >= 1"):
        SyntheticMLP(0)
