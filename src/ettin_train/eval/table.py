"""The results of `ettin-eval`: `eval.json` (the settings, the phase boundaries and one row per model kind,
tag and held-out source, and per downstream task and metric), the same rows as `eval.csv`, and `eval.png`,
each metric against tokens seen.

A held-out row fills loss, accuracy, perplexity; a downstream row (an lm-eval task or a probe, `data` names it)
fills `metric` (acc, acc_norm, ...), `score` and `items` (how many items it was scored on)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

COLUMNS = ["kind", "objective", "tag", "phase", "step", "tokens", "data", "loss", "accuracy", "perplexity",
           "scored_tokens", "metric", "score", "items", "source"]
METRICS = ("loss", "accuracy", "perplexity")


class Table:
    def __init__(self, out: Path):
        self.out = Path(out)
        self.json, self.csv, self.png = self.out / "eval.json", self.out / "eval.csv", self.out / "eval.png"
        saved = json.loads(self.json.read_text()) if self.json.exists() else {}
        self.settings: dict | None = saved.get("settings")
        self.phases: dict = saved.get("phases", {})
        self.rows: list[dict] = saved.get("rows", [])

    def has(self, kind: str, tag: str, data: str) -> bool:
        return any(r["kind"] == kind and r["tag"] == tag and r["data"] == data for r in self.rows)

    def add_scores(self, base: dict, data: str, scores: dict[str, float], items: int | None) -> None:
        """The downstream rows of one task (or probe) `data`: one per metric, all saved together."""
        for metric, value in scores.items():
            self.rows.append({c: {**base, "data": data, "metric": metric, "score": value, "items": items}.get(c) for c in COLUMNS})
        self.save()

    def objective_of(self, kind: str) -> str | None:
        return next((r["objective"] for r in self.rows if r["kind"] == kind), None)

    def add(self, row: dict) -> None:
        self.rows.append({c: row.get(c) for c in COLUMNS})
        self.save()

    def save(self) -> None:
        """eval.json and eval.csv, each written whole to a temporary file and renamed (never half a table)."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows.sort(key=lambda r: (r["kind"], r["data"], r.get("metric") or "", r["tokens"] if r["tokens"] is not None else -1,
                                      r["tag"]))
        _atomic(self.json, json.dumps({"settings": self.settings, "phases": self.phases, "rows": self.rows}, indent=1) + "\n")
        tmp = self.csv.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.csv)

    def plot(self) -> Path:
        """eval.png: one panel per metric against tokens seen, a line per model kind and held-out source
        (encoder and decoder of a pair on one figure), the starts of the later phases as dashed lines."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        # a panel per held-out metric, then one per downstream (task, metric): a row is in a panel if `value` finds it
        panels = [(m, m if m != "accuracy" else "accuracy (masked / next token)", lambda r, m=m: r.get(m))
                  for m in METRICS if any(r.get(m) is not None for r in self.rows)]
        panels += [(f"{d}: {m}", f"{d}: {m}", lambda r, d=d, m=m: r.get("score") if (r["data"], r.get("metric")) == (d, m) else None)
                   for d, m in sorted({(r["data"], r["metric"]) for r in self.rows if r.get("metric")})]
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
        series = sorted({(r["kind"], r["objective"], r["data"]) for r in self.rows})
        # a colour per model kind (its phase lines too), a line style per held-out source
        color = {k: f"C{i}" for i, k in enumerate(sorted({r["kind"] for r in self.rows} | set(self.phases)))}
        style = {d: ("-", ":", "-.", (0, (5, 1)))[i % 4] for i, d in enumerate(sorted({r["data"] for r in self.rows}))}
        for ax, (metric, title, value) in zip(axes[0], panels):
            for kind, objective, data in series:
                pts = sorted((r["tokens"], value(r)) for r in self.rows if (r["kind"], r["data"]) == (kind, data)
                             and r["tokens"] is not None and value(r) is not None)
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, color=color[kind], ls=style[data], label=f"{kind} ({objective}), {data}")
            starts: dict[tuple[str, int], list[str]] = {}  # (phase, tokens) -> the kinds whose phase starts there
            for kind, phases in sorted(self.phases.items()):
                for phase, start in phases.items():
                    if phase != "pretrain":
                        starts.setdefault((phase, start), []).append(kind)
            for (phase, start), kinds in sorted(starts.items(), key=lambda x: x[0][1]):
                shared = len(kinds) == len(self.phases)  # the pair's phases start together: one line
                c = "0.4" if shared else color[kinds[0]]
                ax.axvline(start, color=c, ls="--", lw=0.8, alpha=0.7)
                ax.text(start, 0.98, phase if shared else f"{kinds[0]}: {phase}", transform=ax.get_xaxis_transform(),
                        rotation=90, va="top", ha="right", fontsize=7, color=c)
            ax.set_xlabel("tokens seen")
            ax.set_title(title)
            if metric == "perplexity":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        tmp = self.png.with_name("eval.tmp.png")
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        os.replace(tmp, self.png)
        return self.png


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def format_table(path: str | Path) -> str:
    """The rows of an eval.json (or of the eval.json in a folder) as aligned text."""
    path = Path(path)
    table = Table(path if path.is_dir() else path.parent)
    shown = ["kind", "tag", "tokens", "data", "loss", "accuracy", "perplexity"]
    if any(r.get("metric") for r in table.rows):
        shown += ["metric", "score", "items"]
    cells = [[_cell(r.get(c)) for c in shown] for r in table.rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(shown)] if cells else [len(c) for c in shown]
    lines = ["  ".join(c.ljust(w) for c, w in zip(shown, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def print_table(path: str | Path) -> None:
    """Prints the eval table of `ettin-eval --out DIR` (DIR or DIR/eval.json) and where its plot is."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    print(format_table(folder))
    if (folder / "eval.png").exists():
        print(f"plot: {folder / 'eval.png'}")


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)
