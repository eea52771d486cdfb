"""The per-step RNG policy, deterministic mode's caveats and the manifest format check."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import ftmpi
from ftmpi.config import Config
from ftmpi.manifest import FORMAT_VERSION, build_manifest, read_manifest, write_json_atomic
from ftmpi.repro import apply_deterministic, caveats, rng_policy, seed_step
from ftmpi.sampler import ShardedBatches, step_seed


def draws() -> tuple[float, float, float]:
    return torch.rand(1).item(), float(np.random.rand()), random.random()


def test_seed_step_reseeds_torch_numpy_and_random_from_step_seed():
    assert seed_step(5, seed=3, worker=1) == step_seed(3, 5, 1)
    first = draws()
    seed_step(5, seed=3, worker=1)
    assert draws() == first
    seed_step(6, seed=3, worker=1)
    assert draws() != first
    seed_step(5, seed=3, worker=0)
    assert draws() != first


def test_seed_step_defaults_before_init_and_rejects_negative_values():
    assert seed_step(2) == step_seed(0, 2, 0)
    with pytest.raises(ValueError, match="step=-1 must be an integer >= 0"):
        seed_step(-1)


class FakeOptimizer:
    position = 0


def test_training_state_reseeds_every_batch_so_a_rewind_replays_the_draws():
    x, y = torch.randn(64, 3), torch.zeros(64, dtype=torch.long)
    batches = ShardedBatches(x, y, 8, worker=1, workers=2, seed=4)
    state = ftmpi.TrainingState(FakeOptimizer(), batches)
    assert state.reseed
    seen = {}
    for _ in range(3):
        step, _, _ = next(state.batches)
        seen[step] = draws()
    state.rewind(1)
    step, _, _ = next(state.batches)
    assert step == 1 and draws() == seen[1]
    seed_step(2, seed=4, worker=1)
    assert draws() == seen[2]


def test_training_state_reseed_can_be_switched_off():
    batches = ShardedBatches(torch.randn(16, 2), torch.zeros(16), 4, worker=0, workers=1, seed=0)
    state = ftmpi.TrainingState(FakeOptimizer(), batches, reseed=False)
    assert not state.reseed and batches.on_step is None


def test_caveats_name_what_breaks_bit_exactness():
    quiet = Config(deterministic=1, kill="server:0@step=5", strategy="checkpoint", run_dir="r")
    assert caveats(quiet, backend="mpi", workers=2) == []
    loud = Config(deterministic=1, mode="async", kill="server:0@30s")
    found = " | ".join(caveats(loud, backend="horovod", workers=4))
    for text in ("mode=async", "backend=horovod", "more than 2 workers", "server:0@30s"):
        assert text in found
    assert "deterministic=0" in caveats(Config(), backend="mpi", workers=2)[0]
    chain = Config(strategy="chain", servers=3, chain_ack="next", deterministic=1)
    assert "chain_ack=next" in caveats(chain, backend="mpi", workers=2)[0]


def test_deterministic_mode_switches_on_torch_deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    try:
        assert apply_deterministic(Config(deterministic=1))
    finally:
        torch.use_deterministic_algorithms(before)


def test_manifest_records_rng_policy_determinism_and_failure_schedule():
    config = Config(seed=7, kill="server:0@step=3")
    doc = build_manifest(config, run_id="r", num_workers=2, num_servers=1, backend="mpi")
    assert doc["rng"] == rng_policy(7) and doc["failures"] == {"schedule": "server:0@step=3"}
    assert doc["determinism"]["deterministic"] is False
    assert doc["layout"]["servers"] == [2] and doc["host"]["cpu"]
    assert doc["format_version"] == FORMAT_VERSION


def test_manifest_from_a_newer_format_is_refused(tmp_path):
    path = tmp_path / "manifest.json"
    write_json_atomic(path, {"format_version": FORMAT_VERSION + 1, "run_id": "x"})
    with pytest.raises(ValueError, match=f"format_version={FORMAT_VERSION + 1} is newer"):
        read_manifest(path)
    path.write_text(json.dumps({"run_id": "x"}))
    with pytest.raises(ValueError, match="not an ftmpi manifest"):
        read_manifest(path)
    write_json_atomic(path, {"format_version": 1, "run_id": "old"})
    assert read_manifest(path)["run_id"] == "old"
