"""The suites of ``ftmpi-run bench``: what each measures, its baselines, and its table rows.

Every suite measures its baselines in the same invocation as what it compares with them, with
repeats interleaved (configuration after configuration, then again), and reports medians.
Jobs run ``benchmarks/trainer.py`` (or ``benchmarks/limits.py``) through ``ftmpi-run`` with
``OMP_NUM_THREADS=1``; a row says when its ranks outnumber the cores (oversubscribed).

- ``limits``: memcpy bandwidth, single-core optimizer apply rate, MPI point-to-point bandwidth
  (within the job, and to a spawned rank: a replacement's path);
- ``throughput``: samples/s and the step breakdown vs plain Horovod and vs the MPI backend
  without servers, per model size and server count (2 workers);
- ``scale``: 2, 4 and 8 workers, plain Horovod vs ftmpi with one server;
- ``strategies``: every recovery strategy, one server kill each: steady-state step time (the
  median step), failover, idle time, lost updates, peak RSS per role (a stateless run with a
  long outage included);
- ``recovery``: a chain head killed at several model sizes: failover and state-transfer rate;
- ``placement``: ``server`` against ``mirror`` placement, with 1 worker against no servers and
  with 2 workers against plain Horovod; the workers' idle time per server kill in ``mirror``;
- ``cnn``: the paper's CNN with 2 workers (no servers, and one server in each placement):
  gradients/s against the compute limit measured in the same invocation (one batch's forward,
  backward and step on one core, times the cores).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import limits
from benchmarks.bench_strategies import CORES, STRATEGIES, kill_costs, oversubscribed
from benchmarks.bench_strategies import run as run_strategy
from ftmpi.events import read_events
from launch.command import JobSpec, build_command, find_launcher

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


@dataclass(frozen=True)
class Job:
    """One ``ftmpi-run`` job of the benchmark trainer."""

    label: str
    workers: int = 2
    servers: int = 0
    env: dict[str, str] = field(default_factory=dict)
    plain: bool = False
    trainer_args: tuple[str, ...] = ()

    @property
    def ranks(self) -> int:
        return self.workers + self.servers


@dataclass
class Result:
    """What one job printed (``BENCH`` lines by worker) and logged (events)."""

    workers: list[dict[str, Any]]
    events: list[dict[str, Any]]
    seconds: float

    def lead(self, params: int | None = None) -> dict[str, Any]:
        """Worker 0's line (for the model of ``params`` target, when several were trained)."""
        rows = [w for w in self.workers if w["worker"] == 0]
        if params is not None:
            rows = [w for w in rows if abs(w["params"] - params) <= 0.05 * params]
        return rows[0]


def run_job(job: Job, params: list[int], steps: int, *, kill: str = "", timeout: float = 900):
    """Run ``job`` on models of ``params`` targets for ``steps`` steps; return its
    :class:`Result`. Raises ``RuntimeError`` with the output's tail if it fails."""
    with tempfile.TemporaryDirectory(prefix="ftmpi-bench-") as tmp:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("FTMPI_")},
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "FTMPI_KILL": kill,
            **job.env,
        }
        cmd = [
            *(sys.executable, "-m", "launch.cli", "-np", str(job.workers)),
            *("--servers", str(job.servers), "--run-dir", tmp, "--"),
            *(sys.executable, str(ROOT / "benchmarks" / "trainer.py")),
            *("--steps", str(steps), "--params", *map(str, params), *job.trainer_args),
            *(["--plain-horovod"] if job.plain else []),
        ]
        t0 = time.monotonic()
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env, check=False
        )
        lines = [json.loads(x[6:]) for x in proc.stdout.splitlines() if x.startswith("BENCH ")]
        # after a re-spawn the job may end in an abort once every worker has reported; a plain
        # Horovod job leaves no run record, so ftmpi-run calls it unfinished (status 3)
        complete = len({x["worker"] for x in lines}) == job.workers and (
            proc.returncode == 0 or kill or (job.plain and proc.returncode == 3)
        )
        if not complete:
            raise RuntimeError(
                f"{job.label}: rc {proc.returncode}\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}"
            )
        return Result(lines, read_events(tmp), time.monotonic() - t0)


def peak_rss_mib(result: Result, params: int | None = None) -> dict[str, float]:
    """Largest peak RSS among workers and among servers (MiB)."""
    lead = result.lead(params)
    workers = [w["peak_rss"] for w in result.workers if w["params"] == lead["params"]]
    servers = [s.get("peak_rss", 0) for s in lead.get("server_stats", [])]
    return {
        "worker_peak_rss_mib": round(max(workers) / MIB, 1),
        "server_peak_rss_mib": round(max(servers) / MIB, 1) if servers else None,
    }


def breakdown(lead: dict[str, Any]) -> dict[str, Any]:
    """Forward/backward/step ms, the step's phases and the server's apply ms per update."""
    out: dict[str, Any] = {f"{k}_ms": v for k, v in lead["ms"].items()}
    out.update({f"{k}_ms": v for k, v in lead.get("phases_ms", {}).items()})
    stats = lead.get("server_stats", [])
    if stats:
        per_server = [s["apply_seconds"] / max(s["applied"], 1) for s in stats]
        out["server_apply_ms"] = round(1000 * max(per_server), 3)
        rates = [s["numel"] * s["applied"] / s["apply_seconds"] for s in stats if s["applied"]]
        out["server_apply_params_per_s"] = round(min(rates)) if rates else None
    return out


def interleaved(
    jobs: list[Job], params: list[int], steps: int, repeats: int, log: Callable[[str], None]
) -> dict[str, list[Result]]:
    """Run every job ``repeats`` times, job after job, then again."""
    results: dict[str, list[Result]] = {j.label: [] for j in jobs}
    for r in range(repeats):
        for job in jobs:
            res = run_job(job, params, steps)
            results[job.label].append(res)
            log(f"repeat {r + 1}/{repeats} {job.label}: {res.seconds:.0f} s")
    return results


def median_row(results: list[Result], params: int) -> dict[str, Any]:
    """The median-throughput repeat's worker-0 line, with the median samples/s of all."""
    leads = [r.lead(params) for r in results]
    sps = [x["samples_per_second"] for x in leads]
    med = statistics.median(sps)
    chosen = min(range(len(leads)), key=lambda i: abs(sps[i] - med))
    return {
        "samples_per_s": round(med, 2),
        "samples": sps,
        **breakdown(leads[chosen]),
        **peak_rss_mib(results[chosen], params),
    }


# ------------------------------------------------------------------ suites


def suite_limits(
    quick: bool, log: Callable[[str], None], params: list[int] | None = None
) -> list[dict[str, Any]]:
    """memcpy, optimizer apply rate per optimizer and size (``params``), MPI point-to-point
    bandwidth."""
    nbytes = (64 if quick else 256) * MIB
    memcpy = limits.memcpy_rate(nbytes)
    rows: list[dict[str, Any]] = [_rate_row("memcpy (numpy copyto)", memcpy, "bytes/s")]
    for numel in params or ([1_000_000] if quick else [1_000_000, 25_000_000]):
        for opt in ("sgd", "adam"):
            rate = limits.apply_rate(numel, opt)
            rows.append(_rate_row(f"{opt} step, {numel:,} params, 1 thread", rate, "params/s"))
    chunk_sizes = [MIB, 16 * MIB] if quick else [256 << 10, MIB, 4 * MIB, 16 * MIB]
    probe = [sys.executable, str(ROOT / "benchmarks" / "limits.py"), "--nbytes", str(nbytes)]
    probe += ["--chunk-bytes", *map(str, chunk_sizes), "--repeats", "3" if quick else "5"]
    cmd = limits_command([*probe, "--spawned"])  # a plain MPI program: no ftmpi run record
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env, check=True
    )
    line = next(x for x in out.stdout.splitlines() if x.startswith("BENCH "))
    measured = json.loads(line[6:])
    for key, what in (("p2p_bytes_per_s", ""), ("spawned_p2p_bytes_per_s", " to a spawned rank")):
        for name, rate in measured.get(key, {}).items():
            size = "unchunked" if name == "unchunked" else f"chunks of {int(name[8:]) // 1024} KiB"
            label = f"MPI point-to-point{what}, {nbytes // MIB} MiB, {size}"
            rows.append(_rate_row(label, rate, "bytes/s"))
    log("limits done")
    return rows


def limits_command(probe: list[str]) -> list[str]:
    """The ``mpirun`` line (2 ranks, ULFM, as ``ftmpi-run`` builds it) for ``limits.py``."""
    spec = JobSpec(
        launcher="mpirun",
        executable=find_launcher("mpirun", None),
        nprocs=2,
        env={},
        command=probe,
        as_root=os.geteuid() == 0,
        cpus=os.cpu_count() or 1,
    )
    return build_command(spec)


def _rate_row(limit: str, value: float, unit: str) -> dict[str, Any]:
    row: dict[str, Any] = {"limit": limit, "value": round(value), "unit": unit}
    if unit == "bytes/s":
        row["gib_per_s"] = round(value / (1 << 30), 3)
    return row


THROUGHPUT_JOBS = [
    Job("plain Horovod", plain=True),
    Job("MPI backend, no servers", env={"FTMPI_BACKEND": "mpi"}),
    Job("ftmpi Horovod, 1 server", servers=1),
    Job("ftmpi Horovod, 2 servers", servers=2),
    Job("ftmpi Horovod, 4 servers", servers=4),
    Job("ftmpi MPI, 2 servers", servers=2, env={"FTMPI_BACKEND": "mpi"}),
]


def suite_throughput(
    quick: bool,
    log: Callable[[str], None],
    params: list[int] | None = None,
    only: list[str] | None = None,
    repeats: int | None = None,
) -> list[dict[str, Any]]:
    """Samples/s per model size and configuration (2 workers, sync, SGD momentum, batch 32),
    as ratios to plain Horovod and to the MPI backend without servers. ``params``: model sizes;
    ``only``: configurations whose label contains one of these strings."""
    sizes = params or ([1_000_000] if quick else [1_000_000, 25_000_000, 100_000_000])
    jobs = THROUGHPUT_JOBS[:4] if quick else THROUGHPUT_JOBS
    if only:  # from every configuration, --quick or not
        jobs = [j for j in THROUGHPUT_JOBS if any(o in j.label for o in only)]
    repeats = repeats or (1 if quick else 2)
    results = interleaved(jobs, sizes, 12 if quick else 15, repeats, log)
    return _compare(jobs, results, sizes, ["plain Horovod", "MPI backend, no servers"])


def _compare(
    jobs: list[Job], results: dict[str, list[Result]], sizes: list[int], baselines: list[str]
) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        medians = {j.label: median_row(results[j.label], size) for j in jobs}
        for job in jobs:
            row = {
                "params": results[job.label][0].lead(size)["params"],
                "config": job.label,
                "workers": job.workers,
                "servers": job.servers,
                "oversubscribed": oversubscribed(job.ranks),
                **medians[job.label],
            }
            for base in baselines:
                if base in medians:
                    key = "vs_horovod" if "Horovod" in base else "vs_mpi_no_servers"
                    row[key] = round(row["samples_per_s"] / medians[base]["samples_per_s"], 3)
            rows.append(row)
    return rows


def suite_scale(quick: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """2, 4, 8 workers: plain Horovod vs ftmpi (Horovod backend, 1 server), 1M parameters."""
    rows = []
    for workers in [2, 4] if quick else [2, 4, 8]:
        jobs = [
            Job(f"plain Horovod, {workers} workers", workers=workers, plain=True),
            Job(f"ftmpi Horovod, {workers} workers, 1 server", workers=workers, servers=1),
        ]
        results = interleaved(jobs, [1_000_000], 12, 1, log)
        rows += _compare(jobs, results, [1_000_000], [jobs[0].label])
    return rows


STRATEGY_JOBS = {
    "none": {},
    **{k: v for k, v in STRATEGIES.items() if k != "none"},
    "chain tail ack, length 2": {
        "FTMPI_STRATEGY": "chain",
        "FTMPI_SERVERS": "2",
        "FTMPI_CHAIN_LENGTH": "2",
        "FTMPI_DOWN_FOR": "2",
    },
    "stateless, 12 s outage": {"FTMPI_STRATEGY": "stateless", "FTMPI_DOWN_FOR": "12"},
}


def _strategy_job(name: str, env: dict[str, str], sleep: float) -> Job:
    env = {"FTMPI_CHECKPOINT_EVERY": "20", **env}
    servers = int(env.pop("FTMPI_SERVERS", "1"))
    return Job(name, servers=servers, env=env, trainer_args=("--step-sleep", str(sleep)))


def _kill_row(job: Job, res: Result, params: int, steps: int) -> dict[str, Any]:
    lead = res.lead(params)
    stats = lead.get("server_stats", [])
    summary = {"steps": steps, "versions": [s["version"] for s in stats]}
    stateless = job.env.get("FTMPI_STRATEGY") == "stateless"
    row: dict[str, Any] = {"params": lead["params"], "servers": job.servers}
    row["oversubscribed"] = oversubscribed(job.ranks)
    row["median_step_ms"] = lead["median_step_ms"]
    if any(e["event"] == "kill" for e in res.events):
        row.update(kill_costs(res.events, summary, stateless))
    transfers = [e for e in res.events if e["event"] == "state_transfer" and e.get("seconds")]
    if transfers:
        t = max(transfers, key=lambda e: e["nbytes"])
        row["state_mib"] = round(t["nbytes"] / MIB, 1)
        row["transfer_s"] = t["seconds"]
        row["transfer_gib_per_s"] = round(t["nbytes"] / t["seconds"] / (1 << 30), 3)
        row["pack_s"] = t.get("pack_seconds")
        row["asked_after_s"] = t.get("waited")
        got = [e for e in res.events if e["event"] == "state_received"]
        if got:
            r = max(got, key=lambda e: e["nbytes"])
            row["recv_alloc_s"], row["recv_s"] = r["alloc_seconds"], r["seconds"]
    row["logged_gradients"] = max(w["stale"]["logged"] for w in res.workers)
    row.update(peak_rss_mib(res, params))
    return row


def suite_strategies(quick: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Each strategy with server 0 (the chain head) killed at step 10; the controls without a
    strategy (``none``, ``none, 3 servers``) run without a kill."""
    params, steps, kill_at, sleep = 1_000_000, 70, 10, 0.25
    names = ["none", "chain tail ack", "stateless"] if quick else list(STRATEGY_JOBS)
    rows = []
    base = None
    for name in names:
        job = _strategy_job(name, STRATEGY_JOBS[name], sleep)
        control = job.env.get("FTMPI_STRATEGY", "none") == "none"  # nothing survives a kill
        kill = "" if control else f"server:0@step={kill_at}"
        try:
            res = run_job(job, [params], steps, kill=kill)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            rows.append({"strategy": name, "error": str(exc)[-500:]})
            continue
        row = {"strategy": name, **_kill_row(job, res, params, steps)}
        base = row["median_step_ms"] if name == "none" else base
        row["steady_vs_none"] = round(base / row["median_step_ms"], 3) if base else None
        rows.append(row)
        log(f"strategy {name}: {res.seconds:.0f} s")
    return rows


def suite_recovery(
    quick: bool, log: Callable[[str], None], params: list[int] | None = None
) -> list[dict[str, Any]]:
    """A chain (tail ack, length 3) head killed at several model sizes (``params``): failover
    and the state transfer to the replacement (weights + momentum)."""
    rows = []
    sizes = params or ([1_000_000] if quick else [1_000_000, 25_000_000, 100_000_000])
    for params in sizes:
        job = _strategy_job("chain tail ack", STRATEGIES["chain tail ack"], 0.2)
        try:
            res = run_job(job, [params], 60, kill="server:0@step=8")
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            rows.append({"strategy": job.label, "params": params, "error": str(exc)[-500:]})
            continue
        rows.append({"strategy": job.label, **_kill_row(job, res, params, 60)})
        log(f"recovery {params:,}: {res.seconds:.0f} s")
    return rows


def vs_first(
    jobs: list[Job], results: dict[str, list[Result]], sizes: list[int]
) -> list[dict[str, Any]]:
    """Per model size and job: the medians of :func:`median_row` and ``vs_baseline``, the
    samples/s over the first job's (the baseline)."""
    rows = []
    for size in sizes:
        medians = {j.label: median_row(results[j.label], size) for j in jobs}
        base = medians[jobs[0].label]["samples_per_s"]
        for job in jobs:
            rows.append(
                {
                    "params": results[job.label][0].lead(size)["params"],
                    "config": job.label,
                    "workers": job.workers,
                    "servers": job.servers,
                    "oversubscribed": oversubscribed(job.ranks),
                    **medians[job.label],
                    "vs_baseline": round(medians[job.label]["samples_per_s"] / base, 3),
                }
            )
    return rows


MIRROR = {"FTMPI_PLACEMENT": "mirror"}
ONE_WORKER_JOBS = [
    Job("1 worker, no servers", workers=1),
    Job("1 worker + 1 server, server placement", workers=1, servers=1),
    Job("1 worker + 1 server, mirror", workers=1, servers=1, env=MIRROR),
]
TWO_WORKER_JOBS = [
    Job("plain Horovod", plain=True),
    Job("ftmpi Horovod, 1 server, server placement", servers=1),
    Job("ftmpi Horovod, 1 server, mirror", servers=1, env=MIRROR),
]
MIRROR_KILLS = ["chain tail ack", "stateless", "checkpoint (async writes)"]


PLACEMENT_PARTS = ("1 worker", "2 workers", "kills")


def suite_placement(
    quick: bool,
    log: Callable[[str], None],
    repeats: int | None = None,
    only: list[str] | None = None,
) -> list[dict[str, Any]]:
    """``server`` against ``mirror`` placement (sync, SGD momentum, batch 32): (a) 1 worker +
    1 server (each rank its own core) against 1 worker without servers at 1M, 25M and 100M
    parameters; (b) 2 workers + 1 server against plain Horovod at 25M and 100M; (c) per
    strategy, the workers' idle time for one server kill (1M parameters), in mirror and in
    server placement. ``only``: the parts of :data:`PLACEMENT_PARTS` to run (default all)."""
    repeats = repeats or (1 if quick else 2)
    steps = 12 if quick else 15
    parts = only or list(PLACEMENT_PARTS)
    rows = []
    for part, jobs, sizes in (
        (
            "1 worker",
            ONE_WORKER_JOBS,
            [1_000_000] if quick else [1_000_000, 25_000_000, 100_000_000],
        ),
        ("2 workers", TWO_WORKER_JOBS, [25_000_000] if quick else [25_000_000, 100_000_000]),
    ):
        if part in parts:
            rows += vs_first(jobs, interleaved(jobs, sizes, steps, repeats, log), sizes)
    if "kills" not in parts:
        return rows
    kills = [
        (f"{place}, {name}", {**STRATEGIES[name], **env})
        for name in MIRROR_KILLS
        for place, env in (("mirror", MIRROR), ("server placement", {}))
    ]
    for label, env in kills[:2] if quick else kills:
        job = _strategy_job(label, env, 0.25)
        try:
            res = run_job(job, [1_000_000], 70, kill="server:0@step=10")
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            rows.append({"strategy": job.label, "error": str(exc)[-500:]})
            continue
        rows.append({"strategy": job.label, **_kill_row(job, res, 1_000_000, 70)})
        log(f"{job.label}: {res.seconds:.0f} s")
    return rows


CNN_JOBS = {
    "2 workers, no servers": {"FTMPI_SERVERS": "0"},
    "2 workers + 1 server, server placement": {},
    "2 workers + 1 server, mirror": {"FTMPI_PLACEMENT": "mirror"},
}


def suite_cnn(
    quick: bool, log: Callable[[str], None], repeats: int | None = None
) -> list[dict[str, Any]]:
    """The paper's CNN (813,258 parameters, batch 32, strategy ``none``) with 2 workers:
    gradients/s (steps/s times workers, medians of interleaved repeats) against the compute
    limit (:func:`benchmarks.limits.cnn_step_rate` times the cores), measured before and after
    the jobs."""
    repeats = repeats or (1 if quick else 3)
    steps = 150 if quick else 400
    limit = [limits.cnn_step_rate() * CORES]
    sps: dict[str, list[float]] = {name: [] for name in CNN_JOBS}
    for _ in range(repeats):
        for name, env in CNN_JOBS.items():
            summary, _events = run_strategy({"FTMPI_STRATEGY": "none", **env}, steps)
            sps[name].append(summary["steps_per_second"])
            log(f"cnn {name}: {sps[name][-1]:.1f} steps/s")
    limit.append(limits.cnn_step_rate() * CORES)
    bound = statistics.mean(limit)
    label = "compute limit (one core's forward + backward + step, times the cores)"
    rows: list[dict[str, Any]] = [{"config": label, "gradients_per_s": round(bound, 1)}]
    for name, env in CNN_JOBS.items():
        servers = int(env.get("FTMPI_SERVERS", "1"))
        grads = 2 * statistics.median(sps[name])
        rows.append(
            {
                "config": name,
                "oversubscribed": oversubscribed(2 + servers),
                "gradients_per_s": round(grads, 1),
                "vs_compute_limit": round(grads / bound, 3),
            }
        )
    return rows


OVERLAP_PAIRS = {
    "no servers, Horovod backend": {"FTMPI_SERVERS": "0"},
    "no servers, MPI backend": {"FTMPI_SERVERS": "0", "FTMPI_BACKEND": "mpi"},
    "1 server, server placement": {},
    "1 server, mirror": {"FTMPI_PLACEMENT": "mirror"},
}


def suite_overlap(
    quick: bool, log: Callable[[str], None], repeats: int | None = None
) -> list[dict[str, Any]]:
    """Gradient averaging during backward (``overlap``, 1 MiB buckets) against averaging after
    backward (``FTMPI_OVERLAP=0``), 2 workers, sync, SGD momentum, batch 32, per configuration
    of :data:`OVERLAP_PAIRS` at 1M and 25M parameters (interleaved repeats, medians), and the
    paper's CNN without servers (``cnn_*`` rows: steps/s)."""
    repeats = repeats or (1 if quick else 2)
    sizes = [1_000_000] if quick else [1_000_000, 25_000_000]
    jobs = [
        Job(f"{name}, {when}", servers=int(env.get("FTMPI_SERVERS", "1")), env=dict(env, **flag))
        for name, env in OVERLAP_PAIRS.items()
        for when, flag in (("after backward", {"FTMPI_OVERLAP": "0"}), ("overlap", {}))
    ]
    results = interleaved(jobs, sizes, 12 if quick else 15, repeats, log)
    rows = []
    for size in sizes:
        for after, during in zip(jobs[::2], jobs[1::2], strict=True):
            base = median_row(results[after.label], size)
            for job, row in ((after, base), (during, median_row(results[during.label], size))):
                rows.append(
                    {
                        "params": results[job.label][0].lead(size)["params"],
                        "config": job.label,
                        "oversubscribed": oversubscribed(job.ranks),
                        **row,
                        "vs_after_backward": round(row["samples_per_s"] / base["samples_per_s"], 3),
                    }
                )
    steps = 150 if quick else 400
    cnn: dict[str, list[float]] = {"after backward": [], "overlap": []}
    for _ in range(repeats + 1):
        for when, flag in (("after backward", "0"), ("overlap", "1")):
            env = {"FTMPI_STRATEGY": "none", "FTMPI_SERVERS": "0", "FTMPI_OVERLAP": flag}
            summary, _events = run_strategy(env, steps)
            cnn[when].append(summary["steps_per_second"])
            log(f"cnn {when}: {cnn[when][-1]:.1f} steps/s")
    base = statistics.median(cnn["after backward"])
    for when, sps in cnn.items():
        rows.append(
            {
                "config": f"paper's CNN, 2 workers, no servers, {when}",
                "cnn_steps_per_s": round(statistics.median(sps), 2),
                "samples": sps,
                "vs_after_backward": round(statistics.median(sps) / base, 3),
            }
        )
    return rows


SUITES: dict[str, Callable[..., list[dict[str, Any]]]] = {  # fn(quick, log, **options)
    "limits": suite_limits,
    "throughput": suite_throughput,
    "scale": suite_scale,
    "strategies": suite_strategies,
    "recovery": suite_recovery,
    "placement": suite_placement,
    "cnn": suite_cnn,
    "overlap": suite_overlap,
}
"""Suite name -> ``fn(quick, log, **options) -> rows``, in the order ``ftmpi-run bench`` runs
them (``limits``, ``throughput`` and ``recovery`` take a ``params`` option, ``throughput``
``only`` and ``repeats`` options)."""
