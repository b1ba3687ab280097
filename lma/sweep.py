"""Sweeps: every embedding kind at every compression over several seeds, with paired statistics.

``run_sweep`` trains one model per (kind, options, compression, seed) and appends a row to
``runs.csv`` as each run finishes, so an interrupted sweep resumes where it stopped (runs already
in the CSV are skipped). From the CSV it writes:

``summary.md``
    per kind (variant) x compression: runs, mean +- std test AUC, serving bytes, training speed
    relative to ``full``, and the paired difference of test AUC against ``full`` at the same seed
    with a 95% t-interval; a difference is *resolved* when the interval excludes 0.
``auc_vs_bytes.png``
    test AUC (mean, with the seed-to-seed spread) against serving bytes, log x, one line per
    kind (variant).

Seeds drive the train/validation/test split, the initialisation and the hashes, so a paired
difference compares two kinds on the same split.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import multiprocessing
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

DEFAULT_KINDS = ("full", "hash", "robez", "lma", "qr")
DEFAULT_COMPRESSIONS = (1, 4, 16, 64, 256, 1000)
DEFAULT_SEEDS = (0, 1, 2)
# Options equal to the kinds' defaults are dropped, so that a variant never repeats a main run.
_DEFAULT_OPTIONS: dict[str, Any] = {"z": 1, "aligned": False, "set_kind": "rows"}
CSV_NAME, SUMMARY_NAME, PLOT_NAME = "runs.csv", "summary.md", "auc_vs_bytes.png"
METRICS = (
    "test_auc", "test_logloss", "val_auc", "train_rows_per_s", "embedding_params",
    "serving_bytes", "embedding_serving_bytes", "best_epoch",
)
COLUMNS = ("key", "variant", "kind", "compression", "seed", "options", "status", "error",
           *METRICS, "wall_s")

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """0.975 quantile of Student's t with ``df`` degrees of freedom (table, then Cornish-Fisher)."""
    if df < 1:
        raise ValueError("a t-interval needs at least 2 paired runs")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _normalise(options: dict[str, Any], kind: str = "") -> dict[str, Any]:
    from lma.embeddings import EMBEDDINGS

    defaults = dict(_DEFAULT_OPTIONS)
    if kind in EMBEDDINGS and hasattr(EMBEDDINGS[kind], "default_z"):
        defaults["z"] = EMBEDDINGS[kind].default_z  # lma: 4, robez: 1
    return {k: v for k, v in sorted(options.items()) if defaults.get(k, object()) != v}


@dataclass(frozen=True)
class Run:
    """One training run of the sweep."""

    kind: str
    compression: float
    seed: int
    options_json: str = "{}"  # normalised, sorted JSON of the embedding options

    @property
    def options(self) -> dict[str, Any]:
        return json.loads(self.options_json)

    @property
    def variant(self) -> str:
        """Kind plus non-default options, e.g. ``lma z=4 aligned=True``."""
        opts = self.options
        return " ".join([self.kind, *(f"{k}={v}" for k, v in opts.items())])

    @property
    def key(self) -> str:
        return f"{self.kind}|{self.compression:g}|{self.seed}|{self.options_json}"


def make_run(kind: str, compression: float, seed: int, options: dict[str, Any] | None = None) -> Run:
    return Run(kind, float(compression), int(seed),
               json.dumps(_normalise(options or {}, kind), sort_keys=True))


def default_variants(dim: int = 16, compression: float = 16) -> list[tuple[str, float, dict[str, Any]]]:
    """Extra runs at one compression: LMA block sizes (aligned or not), co-occurrence sets, and
    ROBE-Z with whole-embedding blocks. Block sizes that do not divide ``dim`` are left out."""
    out: list[tuple[str, float, dict[str, Any]]] = []
    for z in (1, 4, 16):  # the default block size's variant drops out as a repeat
        if dim % z == 0:
            for aligned in (False, True):
                out.append(("lma", compression, {"z": z, "aligned": aligned}))
    out.append(("lma", compression, {"set_kind": "cooccur"}))
    if dim % 16 == 0:
        out.append(("robez", compression, {"z": 16}))
    return out


def plan_runs(kinds: Sequence[str], compressions: Sequence[float], seeds: Sequence[int],
              variants: Iterable[tuple[str, float, dict[str, Any]]] = ()) -> list[Run]:
    """Runs in a stable order: seed-major, so that every kind of a seed finishes early."""
    runs: list[Run] = []
    for seed in seeds:
        for kind in kinds:
            for c in ([1.0] if kind == "full" else compressions):
                runs.append(make_run(kind, c, seed))
        for kind, c, opts in variants:
            runs.append(make_run(kind, c, seed, opts))
    seen: set[str] = set()
    return [r for r in runs if not (r.key in seen or seen.add(r.key))]  # type: ignore[func-returns-value]


# ---------------------------------------------------------------- CSV


def read_runs(path: str | Path) -> list[dict[str, Any]]:
    """Rows of ``runs.csv`` (metrics as floats; a row cut off by a crash is dropped)."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    with p.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("wall_s") in (None, ""):
                continue  # incomplete line
            for m in (*METRICS, "compression", "wall_s"):
                v = row.get(m, "")
                row[m] = float(v) if v not in ("", None) else math.nan
            row["seed"] = int(row["seed"])
            out.append(row)
    return out


def _append_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)
        f.flush()


# ---------------------------------------------------------------- running


TrainFn = Callable[[Any], Any]  # TrainConfig -> TrainResult (``.metrics``)


@dataclass
class SweepPaths:
    csv: Path
    summary: Path
    plot: Path | None
    ran: list[str] = field(default_factory=list)  # keys trained by this call
    skipped: list[str] = field(default_factory=list)  # keys already in the CSV


def _default_trainer() -> TrainFn:
    """train_model with the splits of each seed loaded once and shared by all kinds."""
    from lma.train import TrainConfig, load_splits, train_model

    cache: dict[int, Any] = {}

    def run(cfg: TrainConfig) -> Any:
        if cfg.seed not in cache:
            cache.clear()  # runs are seed-major: keep one seed's data in memory
            cache[cfg.seed] = load_splits(cfg)[0]
        return train_model(cfg, cache[cfg.seed])

    return run


def _execute(run: Run, cfg: Any, train: TrainFn) -> dict[str, Any]:
    """Train one planned run; a failure becomes a ``failed`` row instead of stopping the sweep."""
    row: dict[str, Any] = {
        "key": run.key, "variant": run.variant, "kind": run.kind,
        "compression": f"{run.compression:g}", "seed": run.seed, "options": run.options_json,
    }
    t0 = time.perf_counter()
    try:
        metrics = train(cfg).metrics
        row.update({m: metrics.get(m, "") for m in METRICS}, status="ok", error="")
    except Exception as e:  # one failed run (e.g. a budget a kind cannot meet) must not stop a sweep
        log.warning("sweep: %s failed: %s", run.variant, e, exc_info=not isinstance(e, ValueError))
        row.update(status="failed", error=f"{type(e).__name__}: {e}"[:500])
    row["wall_s"] = f"{time.perf_counter() - t0:.3f}"
    return row


_WORKER_TRAINER: TrainFn | None = None


def _run_in_worker(run: Run, cfg: Any) -> dict[str, Any]:
    global _WORKER_TRAINER
    if _WORKER_TRAINER is None:
        _WORKER_TRAINER = _default_trainer()
    return _execute(run, cfg, _WORKER_TRAINER)


def run_sweep(
    data: str,
    out_dir: str | Path,
    kinds: Sequence[str] = DEFAULT_KINDS,
    compressions: Sequence[float] = DEFAULT_COMPRESSIONS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    variants: Iterable[tuple[str, float, dict[str, Any]]] | None = None,
    schema: str | None = None,
    train_kwargs: dict[str, Any] | None = None,
    trainer: TrainFn | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    jobs: int = 1,
) -> SweepPaths:
    """Train every planned run not yet in ``out_dir/runs.csv``, then write the summary and plot.

    data, schema:  the ``--data`` spec (and schema file) of every run
    variants:      extra (kind, compression, options) runs per seed; None = :func:`default_variants`
    train_kwargs:  other :class:`lma.train.TrainConfig` fields (dim, epochs, lr, batch_size, ...)
    trainer:       TrainConfig -> result with ``.metrics``; default ``lma.train.train_model``
    retry_failed:  run again the runs recorded as failed (e.g. after a fix)
    jobs:          worker processes (default trainer only); give each one thread
    """
    from lma.train import TrainConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / CSV_NAME
    kw = dict(train_kwargs or {})
    dim = int(kw.get("dim", 16))
    if variants is None:
        variants = default_variants(dim)
    runs = plan_runs(kinds, compressions, seeds, variants)
    done = {r["key"]: r["status"] for r in read_runs(csv_path)}
    todo = [r for r in runs if r.key not in done or (retry_failed and done[r.key] != "ok")]
    todo_keys = {r.key for r in todo}
    paths = SweepPaths(csv_path, out / SUMMARY_NAME, None,
                       skipped=[r.key for r in runs if r.key not in todo_keys])
    if paths.skipped:
        log.info("sweep: %d of %d runs already in %s", len(paths.skipped), len(runs), csv_path)
    cfgs = [
        TrainConfig(data=data, schema=schema, embedding=run.kind, compression=run.compression,
                    seed=run.seed, options=run.options, **{"progress": False, **kw})
        for run in todo
    ]
    bar = tqdm(total=len(todo), desc="sweep", unit="run", disable=not progress)
    if jobs > 1 and trainer is None and len(todo) > 1:
        # Worker processes (spawned: torch and fork do not mix), one run per task; this process
        # alone appends to the CSV, so rows never interleave. Use threads=1 per worker.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = [pool.submit(_run_in_worker, run, cfg) for run, cfg in zip(todo, cfgs, strict=True)]
            for fut in as_completed(futures):
                row = fut.result()
                _append_row(csv_path, row)
                paths.ran.append(row["key"])
                bar.update(1)
    else:
        train = trainer or _default_trainer()
        for run, cfg in zip(todo, cfgs, strict=True):
            row = _execute(run, cfg, train)
            _append_row(csv_path, row)
            paths.ran.append(run.key)
            bar.update(1)
    bar.close()
    rows = read_runs(csv_path)
    paths.summary.write_text(summary_markdown(rows, title=f"Sweep on {data}"))
    paths.plot = plot_auc_vs_bytes(rows, out / PLOT_NAME, title=f"test AUC vs serving bytes ({data})")
    return paths


# ---------------------------------------------------------------- analysis


@dataclass
class GroupStats:
    variant: str
    kind: str
    compression: float
    n: int
    auc_mean: float
    auc_std: float
    serving_bytes: float
    embedding_serving_bytes: float
    rows_per_s: float
    diff_mean: float = math.nan  # paired test AUC difference vs full (same seeds)
    diff_lo: float = math.nan
    diff_hi: float = math.nan
    n_pairs: int = 0
    failed: int = 0

    @property
    def resolved(self) -> bool | None:
        if self.n_pairs < 2:
            return None
        return self.diff_lo > 0 or self.diff_hi < 0


def paired_interval(diffs: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of paired differences (needs >= 2)."""
    d = np.asarray(diffs, dtype=np.float64)
    mean = float(d.mean())
    half = t975(len(d) - 1) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return mean, mean - half, mean + half


def group_stats(rows: list[dict[str, Any]]) -> list[GroupStats]:
    """Statistics per (variant, compression) of the successful runs, full tables first."""
    ok = [r for r in rows if r["status"] == "ok" and np.isfinite(r["test_auc"])]
    full_auc = {r["seed"]: r["test_auc"] for r in ok if r["kind"] == "full"}
    full_speed = [r["train_rows_per_s"] for r in ok if r["kind"] == "full"]
    full_rps = float(np.mean(full_speed)) if full_speed else math.nan
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    failed: dict[tuple[str, float], int] = {}
    for r in rows:
        k = (r["variant"], r["compression"])
        if r["status"] == "ok" and np.isfinite(r["test_auc"]):
            groups.setdefault(k, []).append(r)
        else:
            failed[k] = failed.get(k, 0) + 1
    order = {k: i for i, k in enumerate(DEFAULT_KINDS)}
    out = []
    for (variant, comp) in sorted(set(groups) | set(failed),
                                  key=lambda k: (order.get(k[0].split()[0], 99), k[0], k[1])):
        g = groups.get((variant, comp), [])
        auc = np.array([r["test_auc"] for r in g])
        st = GroupStats(
            variant=variant, kind=variant.split()[0], compression=comp, n=len(g),
            auc_mean=float(auc.mean()) if len(g) else math.nan,
            auc_std=float(auc.std(ddof=1)) if len(g) > 1 else math.nan,
            serving_bytes=float(np.mean([r["serving_bytes"] for r in g])) if g else math.nan,
            embedding_serving_bytes=float(np.mean([r["embedding_serving_bytes"] for r in g])) if g else math.nan,
            rows_per_s=float(np.mean([r["train_rows_per_s"] for r in g])) / full_rps if g else math.nan,
            failed=failed.get((variant, comp), 0),
        )
        if st.kind != "full":
            diffs = [r["test_auc"] - full_auc[r["seed"]] for r in g if r["seed"] in full_auc]
            st.n_pairs = len(diffs)
            if len(diffs) >= 2:
                st.diff_mean, st.diff_lo, st.diff_hi = paired_interval(diffs)
            elif diffs:
                st.diff_mean = diffs[0]
        out.append(st)
    return out


def _bytes(n: float) -> str:
    if not np.isfinite(n):
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def summary_markdown(rows: list[dict[str, Any]], title: str = "Sweep") -> str:
    """The summary table (see module docstring) as markdown."""
    stats = group_stats(rows)
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        f"# {title}",
        "",
        f"{sum(r['status'] == 'ok' for r in rows)} runs ok, {sum(r['status'] != 'ok' for r in rows)} "
        f"failed; seeds {seeds}. Δ AUC is the paired difference of test AUC against `full` at the "
        "same seed (mean and 95% t-interval); *resolved* means the interval excludes 0. Serving "
        "bytes: the whole model (embedding parameters, per-token state and MLPs); embedding bytes: "
        "parameters plus per-token state (vocabulary, signatures). Speed: training rows/s "
        "relative to `full`.",
        "",
        "| kind | compression | runs | test AUC | Δ AUC vs full (95% CI) | resolved | serving bytes "
        "| embedding bytes | speed vs full |",
        "|---|---:|---:|---|---|---|---:|---:|---:|",
    ]
    for s in stats:
        if s.n == 0:
            auc = f"– ({s.failed} failed)"
        elif s.n == 1:
            auc = f"{s.auc_mean:.4f}"
        else:
            auc = f"{s.auc_mean:.4f} ± {s.auc_std:.4f}"
        if s.kind == "full" or s.n_pairs == 0:
            diff = "–"
        elif s.n_pairs == 1:
            diff = f"{s.diff_mean:+.4f} (1 pair)"
        else:
            diff = f"{s.diff_mean:+.4f} [{s.diff_lo:+.4f}, {s.diff_hi:+.4f}]"
        res = {None: "–", True: "yes", False: "no"}[s.resolved if s.kind != "full" else None]
        speed = f"{s.rows_per_s:.2f}x" if np.isfinite(s.rows_per_s) else "–"
        lines.append(
            f"| {s.variant} | {s.compression:g}x | {s.n} | {auc} | {diff} | {res} | "
            f"{_bytes(s.serving_bytes)} | {_bytes(s.embedding_serving_bytes)} | {speed} |"
        )
    return "\n".join(lines) + "\n"


def plot_auc_vs_bytes(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """PNG: mean test AUC (error bars: seed std; dots: single runs), log x, against the
    embedding's bytes (parameters + per-token state; left) and the whole model's (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stats = [s for s in group_stats(rows) if s.n > 0]
    if not stats:
        return None
    fig = Figure(figsize=(13, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    ok = [r for r in rows if r["status"] == "ok" and np.isfinite(r["test_auc"])]
    panels = (("embedding_serving_bytes", "embedding bytes: parameters + per-token state (log)"),
              ("serving_bytes", "serving bytes: whole model (log)"))
    for ax, (field_name, label) in zip(axes, panels, strict=True):
        for variant in dict.fromkeys(s.variant for s in stats):
            ss = sorted((s for s in stats if s.variant == variant), key=lambda s: getattr(s, field_name))
            x = [getattr(s, field_name) for s in ss]
            y = [s.auc_mean for s in ss]
            err = [0.0 if not np.isfinite(s.auc_std) else s.auc_std for s in ss]
            marker = "*" if variant == "full" else "o"
            line = ax.errorbar(x, y, yerr=err, marker=marker, markersize=10 if marker == "*" else 5,
                               capsize=3, label=variant, linestyle="-" if " " not in variant else "none")
            pts = [r for r in ok if r["variant"] == variant]
            ax.scatter([r[field_name] for r in pts], [r["test_auc"] for r in pts], s=8,
                       alpha=0.3, color=line[0].get_color())
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("test AUC (mean ± std over seeds)")
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle(title or "test AUC vs memory")
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p)
    return p


# ---------------------------------------------------------------- CLI


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _seeds(text: str) -> list[int]:
    """``0,1,2`` (a list) or ``5`` (seeds 0..4)."""
    if "," in text:
        return [int(x) for x in text.split(",") if x]
    return list(range(int(text)))


def cmd_sweep(args: argparse.Namespace) -> int:
    from lma.cli import model_kwargs, print_json

    kw: dict[str, Any] = {"on_error": args.on_error, **model_kwargs(args)}
    variants = [] if args.no_variants else default_variants(args.dim, args.variant_compression)
    paths = run_sweep(
        args.data, args.out, kinds=[k for k in args.kinds.split(",") if k],
        compressions=_floats(args.compressions), seeds=_seeds(args.seeds), variants=variants,
        schema=args.schema, train_kwargs=kw, retry_failed=args.retry_failed, jobs=args.jobs,
        progress=not getattr(args, "quiet", False),
    )
    print_json({"csv": str(paths.csv), "summary": str(paths.summary),
                "plot": str(paths.plot) if paths.plot else None,
                "ran": len(paths.ran), "skipped": len(paths.skipped)})
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``lma sweep`` to an argparse subparsers object."""
    from lma.cli import add_data_args, add_model_args

    p = subparsers.add_parser(
        "sweep", help="train every kind x compression x seed; write runs.csv, summary.md, a plot",
        description=__doc__.splitlines()[0],
    )
    add_data_args(p)
    p.add_argument("--out", required=True, help="sweep folder (resumes from its runs.csv)")
    p.add_argument("--kinds", default=",".join(DEFAULT_KINDS), help="comma-separated kinds")
    p.add_argument("--compressions", default=",".join(str(c) for c in DEFAULT_COMPRESSIONS),
                   help="comma-separated compression factors (full runs only at 1)")
    p.add_argument("--seeds", default="3", help="number of seeds (N: 0..N-1) or a list: 0,1,2 (one seed: 3,)")
    p.add_argument("--no-variants", action="store_true",
                   help="skip the extra LMA / ROBE-Z variants (block size, alignment, set kind)")
    p.add_argument("--variant-compression", type=float, default=16.0,
                   help="compression of the extra variants")
    p.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained in parallel worker processes (use with --threads 1)")
    add_model_args(p)
    p.set_defaults(func=cmd_sweep)
    return p


def merge_sweeps(dirs: Sequence[str | Path], out_dir: str | Path, title: str = "Sweep") -> Path:
    """Combine the runs.csv of sweeps run in parallel (e.g. one process per seed) into one
    folder with a merged runs.csv, summary and plot."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    for d in dirs:
        for r in read_runs(Path(d) / CSV_NAME):
            if r["key"] not in seen:
                seen.add(r["key"])
                rows.append(r)
    csv_path = out / CSV_NAME
    csv_path.unlink(missing_ok=True)
    for r in rows:
        _append_row(csv_path, r)
    (out / SUMMARY_NAME).write_text(summary_markdown(rows, title=title))
    plot_auc_vs_bytes(rows, out / PLOT_NAME, title=title)
    return out


if __name__ == "__main__":
    import sys

    ap = argparse.ArgumentParser(prog="python -m lma.sweep", description="sweep utilities")
    sub = ap.add_subparsers(dest="cmd", required=True)
    mp = sub.add_parser("merge", help="merge sweep folders run in parallel")
    mp.add_argument("dirs", nargs="+")
    mp.add_argument("--out", required=True)
    mp.add_argument("--title", default="Sweep")
    a = ap.parse_args()
    merge_sweeps(a.dirs, a.out, a.title)
    sys.exit(0)
