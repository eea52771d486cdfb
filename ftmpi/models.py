"""Models: the seed paper's CNN and a parameter-count-targeted MLP for benchmarks."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PaperCNN", "SyntheticMLP", "count_parameters", "mlp_parameter_count"]

SYNTHETIC_MLP_TOLERANCE = 0.05
"""Maximum relative deviation of :class:`SyntheticMLP`'s size from the requested target."""


def count_parameters(model: nn.Module) -> int:
    """Return the total number of elements of ``model``'s parameters (trainable or not).

    Parameters shared between submodules are counted once. Works for models on any device,
    including the ``meta`` device.
    """
    return sum(p.numel() for p in model.parameters())


class PaperCNN(nn.Module):
    """The seed paper's CNN for ``[N, 1, 28, 28]`` inputs.

    ``conv(1->16, 3x3, pad 1) - ReLU - maxpool 2 - conv(16->32, 3x3, pad 1) - ReLU - maxpool 2 -
    flatten (32*7*7) - fc 512 - ReLU - dropout 0.25 - fc num_classes``. Returns logits
    ``[N, num_classes]``. With 10 classes it has 813,258 parameters.

    Raises:
        ValueError: If ``num_classes < 1`` or ``dropout`` is outside ``[0, 1)``.
    """

    def __init__(self, num_classes: int = 10, *, dropout: float = 0.25) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 512),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[N, 1, 28, 28]`` images to ``[N, num_classes]`` logits."""
        out: torch.Tensor = self.classifier(self.features(x))
        return out


def mlp_parameter_count(
    in_features: int, hidden_width: int, num_hidden_layers: int, num_classes: int
) -> int:
    """Exact parameter count of an MLP with ``num_hidden_layers`` hidden layers of equal width.

    ``in*h + h + (L-1)*(h*h + h) + h*C + C`` (weights plus biases).
    """
    h, layers = hidden_width, num_hidden_layers
    return in_features * h + h + (layers - 1) * (h * h + h) + h * num_classes + num_classes


class SyntheticMLP(nn.Module):
    """An MLP whose parameter count is within 5% of ``num_params_target``.

    ``Linear(in_features, h) - ReLU - [Linear(h, h) - ReLU] * (num_hidden_layers - 1) -
    Linear(h, num_classes)``, with the hidden width ``h`` chosen as the integer that brings the
    exact count closest to the target. Inputs of any shape ``[N, ...]`` are flattened to
    ``[N, in_features]``. Used for ~1M..100M-parameter communication benchmarks.

    Attributes:
        hidden_width: The chosen width ``h``.
        num_hidden_layers: Number of hidden layers.

    Raises:
        ValueError: If an argument is < 1, or no width gets within 5% of the target (the target
            is too small for the architecture; the message gives the smallest achievable count).
    """

    def __init__(
        self,
        num_params_target: int,
        in_features: int = 784,
        num_classes: int = 10,
        *,
        num_hidden_layers: int = 2,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_params_target", num_params_target),
            ("in_features", in_features),
            ("num_classes", num_classes),
            ("num_hidden_layers", num_hidden_layers),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        width = self._solve_width(num_params_target, in_features, num_classes, num_hidden_layers)
        actual = mlp_parameter_count(in_features, width, num_hidden_layers, num_classes)
        if abs(actual - num_params_target) > SYNTHETIC_MLP_TOLERANCE * num_params_target:
            smallest = mlp_parameter_count(in_features, 1, num_hidden_layers, num_classes)
            raise ValueError(
                f"cannot build an MLP within {SYNTHETIC_MLP_TOLERANCE:.0%} of "
                f"num_params_target={num_params_target} with in_features={in_features}, "
                f"num_classes={num_classes}, num_hidden_layers={num_hidden_layers} (closest: "
                f"{actual}, smallest possible: {smallest}); use a larger target or fewer layers"
            )
        self.in_features = in_features
        self.num_classes = num_classes
        self.hidden_width = width
        self.num_hidden_layers = num_hidden_layers
        layers: list[nn.Module] = [nn.Linear(in_features, width), nn.ReLU()]
        for _ in range(num_hidden_layers - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    @staticmethod
    def _solve_width(target: int, in_features: int, num_classes: int, layers: int) -> int:
        """Return the width >= 1 whose exact count is closest to ``target``."""
        a = layers - 1
        b = in_features + 1 + (layers - 1) + num_classes
        c = num_classes - target
        # Positive root of a*h^2 + b*h + c = 0 (linear when there is a single hidden layer).
        estimate = -c / b if a == 0 else (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
        base = max(1, math.floor(estimate))
        candidates = [w for w in (base - 1, base, base + 1, base + 2) if w >= 1]
        return min(
            candidates,
            key=lambda w: (
                abs(mlp_parameter_count(in_features, w, layers, num_classes) - target),
                w,
            ),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten ``[N, ...]`` inputs to ``[N, in_features]`` and return ``[N, num_classes]``."""
        out: torch.Tensor = self.net(x.flatten(1))
        return out
