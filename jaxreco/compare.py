"""Compare the runs of a sweep: a ranked table of hyperparameters and metrics, and plots.

A *run directory* is what ``jaxreco-train`` writes (``config.yaml``, ``metrics.json``,
``tb/``, Hydra's ``.hydra/``), or, for a failed run of a sweep, ``error.json``. A *sweep
directory* holds run directories (``hydra.sweep.dir``: ``0/``, ``1/``, ...).

The hyperparameters shown are the config keys whose values differ between the runs
compared (what the sweep varied). Runs are ranked by one metric (default ``val/rmse``, the
sweep objective: ranking by a test metric would select on the test set); failed and
unfinished runs are listed after the ranked ones, with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import OmegaConf

from jaxreco.tracking import hparams_of

DEFAULT_METRIC = "val/rmse"
CURVE_TAGS = ("train/loss", "eval/val/rmse")


class CompareError(ValueError):
    """Bad input to the comparison (no such directory, no runs, unknown metric)."""


@dataclasses.dataclass
class Run:
    name: str                       # path relative to the directory given (e.g. "3")
    path: Path
    status: str                     # "ok" | "failed" | "incomplete"
    hparams: dict[str, Any]
    metrics: dict[str, float]
    overrides: list[str]
    error: str | None = None
    rank: int | None = None


# ---------------------------------------------------------------------- discovery

def _is_run_dir(d: Path) -> bool:
    return any((d / f).exists() for f in ("metrics.json", "error.json", "config.yaml", ".hydra"))


def _load_config(d: Path) -> dict[str, Any]:
    for f in (d / "config.yaml", d / ".hydra" / "config.yaml"):
        if f.exists():
            cfg = OmegaConf.load(f)
            try:
                return hparams_of(OmegaConf.to_container(cfg, resolve=True))
            except Exception:  # noqa: BLE001 - Hydra-only interpolations (${hydra:...})
                return hparams_of(OmegaConf.to_container(cfg, resolve=False))
    return {}


def load_run(d: Path, name: str) -> Run:
    overrides = []
    if (d / ".hydra" / "overrides.yaml").exists():
        overrides = [str(o) for o in OmegaConf.load(d / ".hydra" / "overrides.yaml")]
    metrics: dict[str, float] = {}
    error = None
    if (d / "error.json").exists():
        status = "failed"
        e = json.loads((d / "error.json").read_text())
        error = f"{e.get('type', 'Error')}: {e.get('message', '')}"
    elif (d / "metrics.json").exists():
        status = "ok"
        metrics = {k: float(v) for k, v in json.loads((d / "metrics.json").read_text()).items()
                   if isinstance(v, (int, float))}
    else:
        status = "incomplete"
        error = "no metrics.json (still running, or killed)"
    return Run(name, d, status, _load_config(d), metrics, overrides, error)


def _run_sort_key(name: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in Path(name).parts]


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Runs under each path: the path itself if it is a run directory, else its subdirectories."""
    runs: list[Run] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise CompareError(f"{p}: no such directory")
        prefix = f"{p.name}/" if len(list(paths)) > 1 else ""
        if (p / "metrics.json").exists() or (p / "error.json").exists():
            runs.append(load_run(p, p.name))
            continue
        found = [d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")
                 and _is_run_dir(d)]
        if not found:
            raise CompareError(f"{p}: no run directories in it (expected subdirectories with "
                               "metrics.json or error.json, as `jaxreco-train -m` writes)")
        runs.extend(load_run(d, prefix + d.name) for d in found)
    return sorted(runs, key=lambda r: _run_sort_key(r.name))


def swept_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose values differ between runs; for a single run, its overrides' keys."""
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r.hparams if k not in keys]
    if len(runs) > 1:
        differs = [k for k in keys if len({json.dumps(r.hparams.get(k), default=str)
                                           for r in runs}) > 1]
    else:
        over = {o.split("=", 1)[0].lstrip("+~") for o in runs[0].overrides}
        differs = [k for k in keys if k in over]
    # Order: as the first run's overrides name them (the command line's order), then the rest.
    order = [o.split("=", 1)[0].lstrip("+~") for r in runs for o in r.overrides]
    return sorted(differs, key=lambda k: (order.index(k) if k in order else len(order), k))


def metric_columns(runs: Sequence[Run], metric: str) -> list[str]:
    names = {k for r in runs for k in r.metrics}
    cols = [metric] + sorted(k for k in names if k.startswith(("val/", "test/")) and k != metric)
    cols += [k for k in ("train/loss", "train/epochs", "perf/train_seconds") if k in names]
    return [c for i, c in enumerate(cols) if c in names and c not in cols[:i]]


def rank_runs(runs: Sequence[Run], metric: str = DEFAULT_METRIC, mode: str = "min") -> list[Run]:
    """Finished runs best first by ``metric`` (NaN last); then failed and unfinished runs."""
    if mode not in ("min", "max"):
        raise CompareError(f"--mode {mode!r}: expected 'min' or 'max'")
    ok = [r for r in runs if r.status == "ok"]
    if ok and not any(metric in r.metrics for r in ok):
        avail = sorted({k for r in ok for k in r.metrics})
        raise CompareError(f"--metric {metric!r}: no run has it; metrics: {', '.join(avail)}")
    sign = 1.0 if mode == "min" else -1.0

    def key(r: Run):
        v = r.metrics.get(metric, math.nan)
        return (math.isnan(v), sign * v if not math.isnan(v) else 0.0, _run_sort_key(r.name))

    ranked = sorted(ok, key=key)
    for i, r in enumerate(ranked, 1):
        r.rank = i
    rest = [r for r in runs if r.status != "ok"]
    return ranked + sorted(rest, key=lambda r: _run_sort_key(r.name))


# ---------------------------------------------------------------------- tables

def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _fmt_metric(v: float | None) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.0f}" if v == int(v) and abs(v) < 1e9 else f"{v:.4f}"


def table_rows(runs: Sequence[Run], keys: Sequence[str], metrics: Sequence[str]) -> list[list[str]]:
    header = ["rank", "run", *keys, *metrics, "status"]
    rows = [header]
    for r in runs:
        status = "ok" if r.status == "ok" else f"{r.status.upper()}: {r.error}"
        rows.append([str(r.rank) if r.rank else "-", r.name, *(_fmt(r.hparams.get(k)) for k in keys),
                     *(_fmt_metric(r.metrics.get(m)) for m in metrics), status])
    return rows


def format_text(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in rows]
    out = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in esc[0]) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in esc[1:]]
    return "\n".join(out)


# ---------------------------------------------------------------------- event files

def _records(path: Path):
    """TFRecord payloads of an event file (lengths read, CRCs not checked; a torn tail stops)."""
    with open(path, "rb") as f:
        while True:
            head = f.read(12)
            if len(head) < 12:
                return
            (n,) = struct.unpack("<Q", head[:8])
            data = f.read(n)
            if len(data) < n or len(f.read(4)) < 4:
                return
            yield data


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` from the event files directly in ``logdir``.

    Reads the TFRecord framing itself: TensorBoard's reader imports TensorFlow when it is
    installed (seconds). Later events of a step replace earlier ones (a resumed run).
    """
    from tensorboardX.proto import event_pb2

    series: dict[str, dict[int, float]] = {}
    scalar_tags: set[str] = set()         # tensor scalars carry their metadata once per tag
    for f in sorted(Path(logdir).glob("events.out.tfevents.*")):
        for rec in _records(f):
            ev = event_pb2.Event.FromString(rec)
            if not ev.HasField("summary"):
                continue
            for v in ev.summary.value:
                if v.metadata.plugin_data.plugin_name == "scalars":
                    scalar_tags.add(v.tag)
                if v.HasField("simple_value"):
                    x = v.simple_value
                elif v.metadata.plugin_data.plugin_name not in ("", "scalars") or (
                        v.metadata.plugin_data.plugin_name == "" and v.tag not in scalar_tags):
                    continue                 # not a scalar (e.g. the HParams session markers)
                elif v.HasField("tensor") and len(v.tensor.float_val) == 1:
                    x = v.tensor.float_val[0]
                elif v.HasField("tensor") and len(v.tensor.tensor_content) == 4:
                    x = struct.unpack("<f", v.tensor.tensor_content)[0]
                else:
                    continue
                series.setdefault(v.tag, {})[ev.step] = float(x)
    return {t: sorted(s.items()) for t, s in series.items()}


# ---------------------------------------------------------------------- plots

def _label(r: Run, keys: Sequence[str]) -> str:
    return f"{r.name}: " + ", ".join(f"{k.split('.')[-1]}={_fmt(r.hparams.get(k))}" for k in keys)


def plot_metric_vs_hparams(runs: Sequence[Run], keys: Sequence[str], metric: str,
                           out_dir: Path) -> list[Path]:
    """One PNG per swept hyperparameter: ``metric`` of each finished run against its value."""
    from matplotlib.figure import Figure

    ok = [r for r in runs if r.status == "ok" and metric in r.metrics]
    paths = []
    for k in keys:
        vals = [r.hparams.get(k) for r in ok]
        fig = Figure(figsize=(5, 3.6), layout="constrained")
        ax = fig.add_subplot()
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
        if numeric:
            xs = [float(v) for v in vals]
            if xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
            distinct = sorted(set(xs))
            if len(distinct) <= 8:                 # a grid: label exactly the values swept
                ax.set_xticks(distinct, [_fmt(v) for v in distinct])
                ax.minorticks_off()
        else:
            cats = sorted({_fmt(v) for v in vals})
            xs = [cats.index(_fmt(v)) for v in vals]
            ax.set_xticks(range(len(cats)), cats)
        ax.scatter(xs, [r.metrics[metric] for r in ok], zorder=3)
        for x, r in zip(xs, ok):
            ax.annotate(r.name, (x, r.metrics[metric]), textcoords="offset points", xytext=(4, 3),
                        fontsize=7)
        ax.set_xlabel(k)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        path = out_dir / f"{metric.replace('/', '_')}_vs_{k.replace('/', '_')}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def plot_learning_curves(runs: Sequence[Run], keys: Sequence[str], out_dir: Path,
                         tags: Sequence[str] = CURVE_TAGS) -> tuple[Path | None, dict]:
    """``learning_curves.png``: each tag of ``tags`` against step, one line per run."""
    from matplotlib.figure import Figure

    curves = {r.name: read_scalars(r.path / "tb") for r in runs if (r.path / "tb").is_dir()}
    tags = [t for t in tags if any(t in c for c in curves.values())]
    if not tags:
        return None, curves
    fig = Figure(figsize=(6 * len(tags), 4), layout="constrained")
    axes = [fig.add_subplot(1, len(tags), i + 1) for i in range(len(tags))]
    for r in runs:
        for ax, t in zip(axes, tags):
            pts = curves.get(r.name, {}).get(t)
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker=".", label=_label(r, keys))
    for ax, t in zip(axes, tags):
        ax.set_title(t)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    path = out_dir / "learning_curves.png"
    fig.savefig(path, dpi=110)
    return path, curves


# ---------------------------------------------------------------------- all of it

def compare(paths: Sequence[str | Path], metric: str = DEFAULT_METRIC, mode: str = "min",
            out_dir: str | Path | None = None, plots: bool = True) -> dict[str, Any]:
    """Ranks the runs under ``paths`` and writes ``compare.md``, ``compare.json`` and PNGs.

    ``out_dir`` defaults to ``<path>/compare`` for one path. Returns ``{"runs", "keys",
    "metrics", "text", "markdown", "files"}``.
    """
    runs = rank_runs(find_runs(paths), metric, mode)
    keys = swept_keys(runs)
    metrics = metric_columns(runs, metric)
    rows = table_rows(runs, keys, metrics)
    text, md = format_text(rows), format_markdown(rows)
    out = Path(out_dir) if out_dir else Path(paths[0]) / "compare"
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "compare.md", out / "compare.json"]
    title = f"# Runs of {', '.join(map(str, paths))}, ranked by {metric} ({mode})\n\n"
    files[0].write_text(title + md + "\n")
    files[1].write_text(json.dumps({
        "metric": metric, "mode": mode, "swept": keys,
        "runs": [{"rank": r.rank, "run": r.name, "path": str(r.path), "status": r.status,
                  "error": r.error, "hparams": {k: r.hparams.get(k) for k in keys},
                  "overrides": r.overrides, "metrics": r.metrics} for r in runs]},
        indent=2, default=str) + "\n")
    if plots:
        files += plot_metric_vs_hparams(runs, keys, metric, out)
        curve_png, _ = plot_learning_curves(runs, keys, out)
        if curve_png:
            files.append(curve_png)
    return {"runs": runs, "keys": keys, "metrics": metrics, "text": text, "markdown": md,
            "files": files}
