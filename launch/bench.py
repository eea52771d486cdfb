"""``ftmpi-run bench [suite ...] [--quick] [--out FILE.json]``: measure ftmpi against its
baselines and this machine's limits in one run; print Markdown tables and write JSON.

Suites (default: all, in this order): ``limits``, ``throughput``, ``scale``, ``strategies``,
``recovery``, ``placement``, ``cnn``, ``overlap`` (see ``benchmarks/suites.py``). ``--quick``
runs a small subset of each (a few minutes). The JSON holds the machine (cores, load), every
suite's rows and the targets:

- ``sync_vs_horovod``: ftmpi (Horovod backend, 2 servers) samples/s over plain Horovod's at
  ~25M parameters (target >= 0.90);
- ``transfer_vs_p2p``: the fastest recovery state transfer over the fastest measured MPI
  point-to-point bandwidth between two ranks of the job (target >= 0.50);
- ``transfer_vs_spawned_p2p``: the same over the fastest point-to-point bandwidth to a spawned
  rank, the path the transfer takes (a replacement is spawned; Open MPI connects it to the
  survivors over TCP even on one node) (target >= 0.50);
- ``apply_vs_single_core``: the server's apply rate (params/s, 1 server) over torch's
  single-thread SGD-momentum rate measured by ``limits`` at the nearest size (target >= 0.50).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

TARGETS = {
    "sync_vs_horovod": 0.90,
    "transfer_vs_p2p": 0.50,
    "transfer_vs_spawned_p2p": 0.50,
    "apply_vs_single_core": 0.50,
}


def _suites() -> dict[str, Any]:
    """The suite table (``benchmarks`` lives beside ``launch`` in the source tree)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.suites import SUITES

    return SUITES


def targets(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The headline ratios, each with its target and whether it was met (None: the
    suites run did not measure it)."""
    out: dict[str, dict[str, Any]] = {}
    thr = [r for r in results.get("throughput", []) if "config" in r]
    sync = [
        r
        for r in thr
        if r["config"] == "ftmpi Horovod, 2 servers" and abs(r["params"] - 25e6) < 2e6
    ]
    out["sync_vs_horovod"] = {"value": sync[0].get("vs_horovod") if sync else None}
    lim = [r for r in results.get("limits", []) if "limit" in r]
    p2p = [r["value"] for r in lim if r["limit"].startswith("MPI point-to-point,")]
    spawned = [r["value"] for r in lim if r["limit"].startswith("MPI point-to-point to a spawned")]
    transfers = [
        r["transfer_gib_per_s"] * (1 << 30)
        for name in ("recovery", "strategies")
        for r in results.get(name, [])
        if r.get("transfer_gib_per_s")
    ]
    out["transfer_vs_p2p"] = {
        "value": round(max(transfers) / max(p2p), 3) if p2p and transfers else None
    }
    out["transfer_vs_spawned_p2p"] = {
        "value": round(max(transfers) / max(spawned), 3) if spawned and transfers else None
    }
    sgd = {
        int(r["limit"].split()[2].replace(",", "")): r["value"]
        for r in lim
        if r["limit"].startswith("sgd step")
    }
    one = [r for r in thr if r["config"] == "ftmpi Horovod, 1 server"]
    if sgd and one:
        row = max(one, key=lambda r: r["params"])
        nearest = min(sgd, key=lambda n: abs(n - row["params"]))
        value = round(row["server_apply_params_per_s"] / sgd[nearest], 3)
        out["apply_vs_single_core"] = {"value": value, "params": row["params"]}
    else:
        out["apply_vs_single_core"] = {"value": None}
    for name, target in TARGETS.items():
        value = out[name]["value"]
        out[name].update(target=target, met=None if value is None else value >= target)
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of ``rows`` (columns: every key in first-seen order; lists omitted)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k, v in r.items() if k not in cols and not isinstance(v, list)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1e6 else f"{v:g}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return " ".join(str(v).split()).replace("|", "/")


def main(argv: Sequence[str]) -> int:
    """Run the chosen suites; print their tables and the targets; write ``--out``."""
    suites = _suites()
    p = argparse.ArgumentParser(prog="ftmpi-run bench", description=__doc__.splitlines()[0])
    p.add_argument("suites", nargs="*", help=f"any of {', '.join(suites)} (default: all)")
    p.add_argument("--quick", action="store_true", help="a small subset (a few minutes)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the results here")
    p.add_argument(
        "--params",
        type=int,
        nargs="+",
        default=None,
        help="model sizes for limits (apply rate), throughput and recovery",
    )
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="throughput: configurations containing these; placement: parts (1 worker, "
        "2 workers, kills)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="throughput, placement, cnn: interleaved repeats (default 2; cnn 3)",
    )
    args = p.parse_args(list(argv))
    unknown = [s for s in args.suites if s not in suites]
    if unknown:
        p.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(suites)}")
    chosen = args.suites or list(suites)
    started, load = time.time(), os.getloadavg()

    def log(message: str) -> None:
        print(f"bench [{time.time() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    results: dict[str, list[dict[str, Any]]] = {}
    doc: dict[str, Any] = {}
    for name in chosen:
        log(f"suite {name}")
        try:
            options: dict[str, Any] = {}
            if name in ("limits", "throughput", "recovery"):
                options["params"] = args.params
            if name == "throughput":
                options.update(only=args.only, repeats=args.repeats)
            if name in ("placement", "cnn", "overlap"):
                options["repeats"] = args.repeats
            if name == "placement":
                options["only"] = args.only
            results[name] = suites[name](args.quick, log, **options)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            results[name] = [{"error": str(exc)[-2000:]}]  # the other suites still run
        print(f"\n### {name}\n\n{markdown(results[name])}", flush=True)
        doc = _document(argv, args.quick, load, started, results)
        if args.out:  # after every suite: a later failure keeps what was measured
            Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print("\n### targets\n\n" + markdown([{"ratio": k, **v} for k, v in doc["targets"].items()]))
    if args.out:
        log(f"wrote {args.out}")
    return 1 if any("error" in r for rows in results.values() for r in rows) else 0


def _document(
    argv: Sequence[str],
    quick: bool,
    load: tuple[float, float, float],
    started: float,
    results: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """The JSON document: command, machine, suites' rows, targets."""
    return {
        "command": ["ftmpi-run", "bench", *argv],
        "quick": quick,
        "machine": {
            "cores": os.cpu_count(),
            "load_average_at_start": load,
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "seconds": round(time.time() - started, 1),
        "suites": results,
        "targets": targets(results),
    }
