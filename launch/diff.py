"""``ftmpi-run diff RUN_A RUN_B``: what differs between two runs, and how their results compare.

Prints the manifest fields that differ, by section (failures, config, environment, versions,
code, data, host and layout; see :mod:`launch.compare` for what is compared), a line naming
both script files when their contents differ, then a table of both runs' results (finished,
final and best test accuracy, final loss, steps, wall seconds, steps/s, restarts, failures that
happened, final weights hash) and the first evaluation where their metrics diverge. Any
script's runs can be compared: ftmpi writes every run's ``manifest.json`` and ``summary.json``.
Exit status 0 whether or not they differ; a directory without a manifest, or with a manifest of
a newer format, ends with a message naming it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from launch.compare import (
    Run,
    difference_lines,
    divergence_line,
    field_differences,
    load_run,
    script_change,
)

RESULT_ROWS = (
    ("finished", "finished"),
    ("final test accuracy", "final_test_accuracy"),
    ("best test accuracy", "best_test_accuracy"),
    ("final loss", "final_loss"),
    ("steps", "steps"),
    ("wall seconds", "wall_seconds"),
    ("steps/s", "steps_per_second"),
)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def result_rows(a: Run, b: Run) -> list[tuple[str, str, str]]:
    """``(label, A, B)`` rows of the results table."""
    oa, ob = a.outcome, b.outcome
    rows = [(label, _cell(oa.get(key)), _cell(ob.get(key))) for label, key in RESULT_ROWS]
    rows.append(
        (
            "restarts",
            _cell((a.launcher or {}).get("restarts", 0)),
            _cell((b.launcher or {}).get("restarts", 0)),
        )
    )
    kills = [
        ", ".join(r.manifest.get("failures", {}).get("happened", {}).get("kills", [])) or "none"
        for r in (a, b)
    ]
    rows.append(("failures", kills[0], kills[1]))
    rows.append(("weights sha256", (a.weights or "-")[:16], (b.weights or "-")[:16]))
    return rows


def render(a: Run, b: Run) -> str:
    """The whole ``diff`` report."""
    lines = [f"A: {a.run_dir} (run {a.manifest.get('run_id', '?')})"]
    lines.append(f"B: {b.run_dir} (run {b.manifest.get('run_id', '?')})")
    diffs = field_differences(a, b)
    lines.append("")
    if diffs:
        lines.append(f"manifest fields that differ ({len(diffs)}):")
        lines += difference_lines(diffs)
    else:
        lines.append("manifest fields: no difference")
    changed = script_change(a, b)
    if changed:
        lines.append(changed)
    rows = result_rows(a, b)
    width = max(len(r[0]) for r in rows)
    cols = [max(len("A"), *(len(r[1]) for r in rows)), max(len("B"), *(len(r[2]) for r in rows))]
    lines += ["", f"results:\n  {'':<{width}}  {'A':>{cols[0]}}  {'B':>{cols[1]}}"]
    lines += [f"  {label:<{width}}  {x:>{cols[0]}}  {y:>{cols[1]}}" for label, x, y in rows]
    same = a.weights is not None and a.weights == b.weights
    lines.append(f"  final weights: {'identical' if same else 'differ'}")
    lines.append("  " + divergence_line(a, b))
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """Entry point of ``ftmpi-run diff``."""
    p = argparse.ArgumentParser(
        prog="ftmpi-run diff", description="What differs between two runs, and their results."
    )
    p.add_argument("run_a", metavar="RUN_A", help="a run directory, e.g. runs/<run id>")
    p.add_argument("run_b", metavar="RUN_B", help="another run directory")
    args = p.parse_args(list(argv))
    try:
        print(render(load_run(args.run_a), load_run(args.run_b)))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"ftmpi-run diff: {exc}") from None
    return 0
