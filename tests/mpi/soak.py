"""Randomised soak: one long run of tests/mpi/progs/ft_train.py with a real SIGKILL every few
seconds, at seeded random victims and times, and the strategy's invariants checked at the end.

The schedule is a pure function of the seed (printed first, with the ``FTMPI_KILL`` it gives,
so a failure can be replayed with ``--seed``). Victims are any server slot (a replacement is
killed by a later spec naming its slot again) or, once, worker 1 (re-spawned, so the run can
still be compared with the one without failure; a re-spawned worker carries out no later
spec). Kill times are seconds after the job started; a replacement starting after its slot's
next kill time dies at once, and kills due after the run ended never happen: the outcome
counts the kills carried out.

    python -m tests.mpi.soak --seconds 600 [--seed N] [--every 8] [--strategy checkpoint]
        [--servers-only]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from ftmpi.faults import KillSpec, format_schedule
from tests.mpi.common import KILLED_REPLACEMENT, kills
from tests.mpi.matrix import STRATEGIES, Checker, Outcome, References, Runner, run_job

STEP_SLEEP = 0.1
"""Seconds each step sleeps, so the run's length in steps follows from its length in seconds."""
START = 8.0
"""No kill before this many seconds after the job started (ranks starting up)."""


def schedule(
    seed: int, *, seconds: float, every: float, servers: int, workers: bool = True
) -> list[KillSpec]:
    """Kills from ``START`` to ``seconds``, gaps uniform in [every/2, 3*every/2]; each victim a
    server slot or (``workers``) worker 1, once at most, uniformly. The same arguments give the
    same schedule."""
    rng = random.Random(seed)
    specs, t = [], START
    while True:
        t += rng.uniform(every / 2, 3 * every / 2)
        if t >= seconds:
            return specs
        victim = rng.randrange(servers + workers)
        if victim == servers and any(k.role == "worker" for k in specs):
            victim = rng.randrange(servers)  # a replacement worker has no later incarnation
        role, index = ("worker", 1) if victim == servers else ("server", victim)
        specs.append(KillSpec(role, index, seconds=round(t, 1)))


def steps_for(seconds: float) -> int:
    """Steps that take at least ``seconds`` at ``STEP_SLEEP`` each."""
    return int(seconds / STEP_SLEEP)


def run_soak(
    run: Runner,
    root: Path,
    *,
    seed: int,
    seconds: float,
    every: float,
    strategy: str = "checkpoint",
    workers: bool = True,
    refs: References | None = None,
) -> tuple[Outcome, str]:
    """One soak run; returns its outcome and the ``FTMPI_KILL`` it used. Sync mode, so the
    run must end bit-for-bit equal to the run without failure (``checkpoint``, ``chain``)."""
    s = STRATEGIES[strategy]
    kill = format_schedule(
        schedule(seed, seconds=seconds, every=every, servers=s.servers, workers=workers)
    )
    steps = steps_for(seconds)
    refs = refs or References(run, root, timeout=4 * seconds + 300)
    env = {**s.env, "FTMPI_MODE": "sync", "FTMPI_KILL": kill, "FTMPI_RESPAWN_WORKERS": "1"}
    out = Outcome(cell=None, seconds=0.0)
    check = Checker(out)
    t0 = time.monotonic()
    run_dir = root / f"soak-{strategy}-{seed}"
    try:
        res, got = run_job(
            run,
            run_dir,
            s,
            env,
            timeout=4 * seconds + 300,
            steps=steps,
            extra=("--step-sleep", str(STEP_SLEEP)),
        )
    except BaseException as exc:  # pytest.fail on a timeout: a hang
        if isinstance(exc, KeyboardInterrupt):
            raise
        check("no hang", False, str(exc).splitlines()[0])
        out.seconds = time.monotonic() - t0
        return out, kill
    out.seconds = time.monotonic() - t0
    check("exit status", res.returncode in (0, KILLED_REPLACEMENT), res.stderr[-1500:])
    out.kills = len(kills(run_dir))
    check("kills carried out", out.kills >= 1, kill)
    if not check("every worker reports", len(got) == 2, (res.stdout + res.stderr)[-2500:]):
        return out, kill
    check("every worker at the end", all(r["position"] == steps for r in got), got)
    check("workers agree", got[0]["weights"] == got[1]["weights"], got)
    check("version == steps", set(got[0]["versions"]) == {steps}, got[0]["versions"])
    if s.exact:
        ref = refs(s, "sync", steps)
        check("bit-exact vs no failure", got[0]["weights"] == ref[0]["weights"], got[0])
    return out, kill


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.mpi.soak", description=__doc__)
    p.add_argument("--seconds", type=float, default=600, help="length of the run (training)")
    p.add_argument("--every", type=float, default=8, help="mean seconds between kills")
    p.add_argument("--seed", type=int, default=None, help="replay a soak (default: random)")
    p.add_argument("--strategy", default="checkpoint", choices=sorted(STRATEGIES))
    p.add_argument("--root", default="runs/soak")
    p.add_argument(
        "--servers-only", action="store_true", help="kill server ranks only, never worker 1"
    )
    args = p.parse_args(argv)
    seed = random.SystemRandom().randrange(1 << 31) if args.seed is None else args.seed
    servers = STRATEGIES[args.strategy].servers
    workers = not args.servers_only
    kill = format_schedule(
        schedule(seed, seconds=args.seconds, every=args.every, servers=servers, workers=workers)
    )
    print(f"soak seed {seed} (replay: --seed {seed}); FTMPI_KILL={kill}", flush=True)
    from tests.conftest import run_mpi

    root = Path(args.root) / time.strftime("%Y%m%d-%H%M%S")
    out, _ = run_soak(
        run_mpi,
        root,
        seed=seed,
        seconds=args.seconds,
        every=args.every,
        strategy=args.strategy,
        workers=workers,
    )
    print(
        json.dumps(
            {
                "seed": seed,
                "strategy": args.strategy,
                "scheduled_kills": len(kill.split(",")) if kill else 0,
                "kills_survived": out.kills if out.ok else 0,
                "kills": out.kills,
                "invariants_checked": out.checked,
                "failures": out.failures,
                "seconds": round(out.seconds, 1),
            },
            indent=1,
        )
    )
    return 0 if out.ok else 1


if __name__ == "__main__":
    sys.exit(main())
