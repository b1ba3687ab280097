"""Plot scripts/bench_model.py results: each model's 1000-row time over full tables', per engine,
for every measurement a results.json holds (single run, each round of ``--rounds``, and the
one-process ``--interleaved`` run), so the spread between runs on a shared machine is visible.

    python scripts/plot_model_bench.py OUT.png RESULTS.json [RESULTS.json ...]

Also writes OUT_ms.png from the last RESULTS.json: each model's 1000-row time per engine (median
of rounds), its key resolution part shaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MODELS = ["lma16/table", "lma16/hot", "robez16"]
ENGINES = ["onnxruntime", "onnxruntime+native", "onnxruntime+native/private", "torch"]


def points(res: dict[str, Any], label: str) -> list[tuple[str, str, str, float]]:
    """(measurement, engine, model, ratio to full/table at 1000 rows)."""
    v = res.get("variants", {})
    out = []
    full = v.get("full/table", {})
    for e in ENGINES:
        rounds = {c["round"]: c["1000"] for c in full.get(f"{e}/model@rounds", [])
                  if "error" not in c}
        for m in MODELS:
            r = v.get(m, {})
            if rounds:
                for c in r.get(f"{e}/model@rounds", []):
                    if "error" not in c and c["round"] in rounds:
                        out.append((f"{label} round {c['round']}", e, m,
                                    c["1000"] / rounds[c["round"]]))
            elif "1000" in r.get(f"{e}/model", {}) and "1000" in full.get(f"{e}/model", {}):
                out.append((label, e, m, r[f"{e}/model"]["1000"] / full[f"{e}/model"]["1000"]))
        il = res.get("interleaved", {}).get(e, {}).get("1000", {}).get("ratio_vs_full", {})
        for m in MODELS:
            if m in il:
                out.append((f"{label} interleaved", e, m, il[m]))
    return out


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, paths = Path(sys.argv[1]), sys.argv[2:]
    pts: list[tuple[str, str, str, float]] = []
    for p in paths:
        pts += points(json.loads(Path(p).read_text()), Path(p).stem)
    engines = [e for e in ENGINES if any(p[1] == e for p in pts)]
    fig, axes = plt.subplots(1, len(engines), figsize=(4 + 3.5 * len(engines), 4.2), sharey=True,
                             squeeze=False)
    axes = axes[0]
    labels = sorted({p[0] for p in pts}, key=[p[0] for p in pts].index)
    width = 0.8 / max(1, len(labels))
    for ax, e in zip(axes, engines, strict=True):
        for j, lab in enumerate(labels):
            ys = [next((p[3] for p in pts if p[0] == lab and p[1] == e and p[2] == m), float("nan"))
                  for m in MODELS]
            ax.bar([i + j * width for i in range(len(MODELS))], ys, width, label=lab)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(0.8, color="r", lw=0.8, ls="--", label="target 0.8")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(MODELS))], MODELS)
        ax.set_title(f"{e}: 1000 rows, time / full tables")
    axes[0].set_ylabel("model time / full-table model time")
    axes[-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plot_ms(json.loads(Path(paths[-1]).read_text()), out.with_name(f"{out.stem}_ms.png"))
    return 0


def plot_ms(res: dict[str, Any], out: Path) -> None:
    """Model time at 1000 rows per engine and model (medians as results.json holds them), the
    key resolution part shaded."""
    import matplotlib.pyplot as plt

    v = res.get("variants", {})
    models = ["full/table", *MODELS]
    engines = [e for e in ENGINES if any("1000" in v.get(m, {}).get(f"{e}/model", {}) for m in models)]
    fig, ax = plt.subplots(figsize=(2.5 + 1.9 * len(engines), 4.2))
    width = 0.8 / len(models)
    for j, m in enumerate(models):
        xs = [i + j * width for i in range(len(engines))]
        tot = [v.get(m, {}).get(f"{e}/model", {}).get("1000", float("nan")) for e in engines]
        res_ = [v.get(m, {}).get(f"{e}/resolve", {}).get("1000", 0.0) for e in engines]
        bars = ax.bar(xs, tot, width, label=m)
        ax.bar(xs, res_, width, color=bars[0].get_facecolor(), hatch="//", edgecolor="k", lw=0)
        for x, t in zip(xs, tot, strict=True):
            ax.text(x, t, f"{t:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(engines))], engines, fontsize=8)
    ax.set_ylabel("ms per call, 1000 rows (hatched: key resolution)")
    ax.set_title("Model time at the Kaggle vocabulary (untrained), one thread")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
