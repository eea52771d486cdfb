"""What two runs have in common and where they differ: the logic behind ``ftmpi-run diff`` and
``ftmpi-run replay``.

A run is read from its directory (:func:`load_run`): ``manifest.json`` (required; a manifest of
a newer format is refused by :func:`ftmpi.manifest.read_manifest`), ``summary.json``,
``launcher.json`` and ``metrics.jsonl`` when present.

**Manifest fields.** Manifests are flattened to dotted keys (``config.mode``, ``trainer.lr``,
``script.sha256``; lists stay whole values) and compared key by key, grouped in the sections of
:data:`SECTIONS`. Left out, because they differ between any two runs or repeat another field:
the run's identity and times (``run_id``, ``created``, ``started``, ``FTMPI_RUN_ID``,
``FTMPI_JOB_START``), ``FTMPI_*`` variables that are also ``config`` fields,
``seed``/``rng.seed`` (``config.seed``), ``config.kill`` (``failures.schedule`` holds the first
attempt's schedule; a relaunch's ``config.kill`` is what was left of it), the determinism
caveats (derived from the config), the outcome and event counts (compared as metrics), and
``argv`` when the script recorded its parsed arguments (``trainer``). A value holding the run's
own directory is compared with that directory written ``<RUN_DIR>``, so two runs in different
directories do not differ by it. :func:`script_change` names the script files when their
contents differ.

**Metrics.** Evaluations (``metrics.jsonl`` rows) are matched by step; the first step where
``loss``, ``train_loss`` or ``test_accuracy`` differ is the first divergence.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from ftmpi.config import Config
from ftmpi.manifest import MANIFEST, read_manifest
from ftmpi.metrics import read_jsonl
from launch.rundir import LAUNCHER_RECORD, SUMMARY

SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("failures", ("failures.",)),
    ("config", ("config.", "trainer.", "ftmpi_env.", "argv", "rng.", "determinism.", "backend")),
    ("environment", ("environment.",)),
    ("versions", ("versions.", "python")),
    ("code", ("script.",)),
    ("data", ("data.",)),
    ("host and layout", ("host.", "layout.", "cwd", "restarts")),
)
"""Section of a flattened key: the first whose prefixes match; anything else is ``other``."""

IGNORED = (
    "format_version",
    "run_id",
    "created",
    "started",
    "seed",
    "rng.seed",
    "config.run_id",
    "config.kill",
    "ftmpi_env.FTMPI_RUN_ID",
    "ftmpi_env.FTMPI_JOB_START",
    "determinism.caveats",
    "failures.happened.events",
)
"""Flattened keys never compared, with the keys below them (see the module docstring)."""

DIVERGENCE_FIELDS = ("loss", "train_loss", "test_accuracy")
RUN_DIR_MARK = "<RUN_DIR>"
_CONFIG_VARS = {"FTMPI_" + f.name.upper() for f in dataclasses.fields(Config)}


@dataclass
class Run:
    """What one run directory holds."""

    run_dir: str
    manifest: dict[str, Any]
    summary: dict[str, Any] | None
    launcher: dict[str, Any] | None
    metrics: list[dict[str, Any]]

    @property
    def outcome(self) -> dict[str, Any]:
        """The manifest's outcome, completed from ``summary.json`` (a run killed after writing
        its summary may not have recorded it in the manifest)."""
        out = dict(self.manifest.get("outcome") or {})
        for key, value in (self.summary or {}).items():
            out.setdefault(key, value)
        accuracies = [r["test_accuracy"] for r in self.metrics if "test_accuracy" in r]
        if accuracies:
            out.setdefault("best_test_accuracy", max(accuracies))
        return out

    @property
    def weights(self) -> str | None:
        return self.outcome.get("weights_sha256")


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_run(run_dir: str) -> Run:
    """Read ``run_dir``. Raises ``FileNotFoundError`` if it holds no ``manifest.json`` and
    ``ValueError`` for a manifest of a newer format (both messages name the path)."""
    path = os.path.join(run_dir, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{run_dir} holds no {MANIFEST}; pass the directory a run wrote, e.g. runs/<run id>"
        )
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    return Run(
        run_dir=run_dir,
        manifest=read_manifest(path),
        summary=_read_json(os.path.join(run_dir, SUMMARY)),
        launcher=_read_json(os.path.join(run_dir, LAUNCHER_RECORD)),
        metrics=read_jsonl(metrics_path) if os.path.exists(metrics_path) else [],
    )


def flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _run_dir_spellings(run: Run) -> list[str]:
    config = run.manifest.get("config", {})
    spellings = {run.run_dir, os.path.abspath(run.run_dir), str(config.get("run_dir") or "")}
    return sorted((s for s in spellings if s), key=len, reverse=True)


def _mask(value: Any, spellings: list[str]) -> Any:
    if isinstance(value, str):
        for s in spellings:
            value = value.replace(s, RUN_DIR_MARK)
        return value
    if isinstance(value, list):
        return [_mask(v, spellings) for v in value]
    return value


def comparable_fields(run: Run) -> dict[str, Any]:
    """The run's manifest as the flattened, masked fields that :func:`field_differences`
    compares."""
    doc = {k: v for k, v in run.manifest.items() if k != "outcome"}
    if "trainer" in doc:
        doc.pop("argv", None)
    spellings = _run_dir_spellings(run)
    return {
        key: _mask(value, spellings)
        for key, value in flatten(doc).items()
        if not any(key == p or key.startswith(p + ".") for p in IGNORED)
        and not (key.startswith("ftmpi_env.") and key[len("ftmpi_env.") :] in _CONFIG_VARS)
    }


def section_of(key: str) -> str:
    """The :data:`SECTIONS` name of a flattened key (``other`` if none matches)."""
    for name, prefixes in SECTIONS:
        if any(key == p or key.startswith(p) for p in prefixes):
            return name
    return "other"


def field_differences(a: Run, b: Run) -> list[tuple[str, Any, Any]]:
    """``(key, value in a, value in b)`` for every compared field that differs, in section
    order, then key order. A field only one run has is compared with ``None``."""
    fa, fb = comparable_fields(a), comparable_fields(b)
    order = [name for name, _ in SECTIONS] + ["other"]
    keys = sorted(set(fa) | set(fb), key=lambda k: (order.index(section_of(k)), k))
    return [(k, fa.get(k), fb.get(k)) for k in keys if fa.get(k) != fb.get(k)]


def first_divergence(a: Run, b: Run) -> tuple[int, str, Any, Any] | None:
    """``(step, field, value in a, value in b)`` at the first evaluation (by step) where the
    runs' metrics differ, or ``None`` if every evaluation both have agrees."""
    by_step = {r.get("step"): r for r in b.metrics}
    for row in sorted(a.metrics, key=lambda r: r.get("step", 0)):
        other = by_step.get(row.get("step"))
        if other is None:
            continue
        for name in DIVERGENCE_FIELDS:
            if row.get(name) != other.get(name):
                return int(row["step"]), name, row.get(name), other.get(name)
    return None


def divergence_line(a: Run, b: Run) -> str:
    """One line on :func:`first_divergence` of ``a`` (A) and ``b`` (B)."""
    div = first_divergence(a, b)
    if div is None:
        return "metrics: every evaluation both runs made agrees"
    step, name, va, vb = div
    return f"metrics first diverge at step {step}: {name} {va} (A) vs {vb} (B)"


def script_change(a: Run, b: Run) -> str | None:
    """One line naming both runs' script files when their contents (``script.sha256``) differ,
    else ``None``."""
    sa, sb = a.manifest.get("script") or {}, b.manifest.get("script") or {}
    if sa.get("sha256") == sb.get("sha256"):
        return None

    def name(script: dict[str, Any]) -> str:
        if not script:
            return "no script file recorded"
        return f"{script.get('path', '?')} (sha256 {str(script.get('sha256'))[:12]})"

    return f"the training script differs: {name(sa)} (A) vs {name(sb)} (B)"


def format_value(value: Any) -> str:
    """A field value on one line (JSON for lists and strings, so empty strings show)."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value, sort_keys=True, default=str)


def difference_lines(diffs: list[tuple[str, Any, Any]], *, indent: str = "  ") -> list[str]:
    """``diffs`` grouped by section: ``section:`` then ``key: A -> B`` lines."""
    lines: list[str] = []
    current = None
    for key, va, vb in diffs:
        section = section_of(key)
        if section != current:
            lines.append(f"{indent}{section}:")
            current = section
        lines.append(f"{indent}  {key}: {format_value(va)} -> {format_value(vb)}")
    return lines
