"""A standard Horovod PyTorch training script (no ftmpi): digits, a CNN or a ~25M MLP.

    mpirun -np 2 python examples/horovod_digits.py --steps 200

Rank 0 prints one JSON line: steps/s, final test accuracy and a SHA-256 of the final weights.
"""

import argparse
import hashlib
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import horovod.torch as hvd


def build_model(name: str) -> torch.nn.Module:
    if name == "cnn":
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(32 * 7 * 7, 512),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.25),
            torch.nn.Linear(512, 10),
        )
    width = 4600  # ~24.8M parameters
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(784, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, 10),
    )


def load_data(seed: int):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(y, dtype=torch.int64)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    x, y = x[order], y[order]
    return x[:1437], y[:1437], x[1437:], y[1437:]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["cnn", "mlp25m"], default="cnn")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=5)
    args = p.parse_args()

    hvd.init()
    torch.manual_seed(42)
    train_x, train_y, test_x, test_y = load_data(seed=0)
    model = build_model(args.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=0.9)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    torch.manual_seed(1000 + hvd.rank())  # per-rank dropout stream

    n = len(train_y) // (args.batch_size * hvd.size()) * args.batch_size * hvd.size()
    start = None
    for step in range(args.steps):
        if step == args.warmup_steps:
            start = time.perf_counter()
        g = np.random.default_rng([0, step // (n // (args.batch_size * hvd.size()))])
        perm = torch.from_numpy(g.permutation(n))
        i = (step % (n // (args.batch_size * hvd.size()))) * args.batch_size * hvd.size()
        idx = perm[i + hvd.rank() * args.batch_size : i + (hvd.rank() + 1) * args.batch_size]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
        loss.backward()
        optimizer.step()
    elapsed = time.perf_counter() - start

    if hvd.rank() == 0:
        model.eval()
        with torch.no_grad():
            acc = (model(test_x).argmax(1) == test_y).float().mean().item()
        digest = hashlib.sha256()  # names and raw bytes in name order, as ftmpi's summary.json
        for name, t in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(t.detach().numpy().tobytes())
        print(
            json.dumps(
                {
                    "model": args.model,
                    "workers": hvd.size(),
                    "steps": args.steps,
                    "steps_per_second": (args.steps - args.warmup_steps) / elapsed,
                    "test_accuracy": acc,
                    "weights_sha256": digest.hexdigest(),
                    "loss": loss.item(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
