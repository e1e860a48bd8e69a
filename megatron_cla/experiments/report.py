"""Report of a sweep (``megatron-cla sweep-report --grid G.yaml --results DIR --out D``).

Writes ``pareto.png`` (validation perplexity vs KV bytes/token: our variants with the mean and the
seed range, and the paper's 1B points on a second panel) and ``report.md`` (per-variant table,
the grid's claimed orderings checked against the seed spread, and the LR sensitivity table).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_cla.experiments.sweep import Grid

__all__ = ["VariantStats", "aggregate", "check_claim", "load_results", "write_report"]

# Paper Table 1 (1B, LR 3e-4): KV bytes/token and validation perplexity.
PAPER_1B = {
    "H128-MQA": (10240, 13.54),
    "H64-MQA": (5120, 13.81),
    "H32-MQA": (2560, 14.37),
    "H128-GQA4": (40960, 13.36),
    "H512-MQA-CLA2": (20480, 13.49),
    "H256-MQA-CLA2": (10240, 13.51),
    "H128-MQA-CLA2": (5120, 13.60),
    "H64-MQA-CLA2": (2560, 13.89),
    "H128-MQA-CLA3": (3584, 13.77),
    "H128-MQA-CLA4": (2560, 13.95),
    "H128-MQA-CLA2-KeepEnds": (5632, 13.62),
}


@dataclass
class VariantStats:
    """One variant at one learning rate, over its seeds."""

    variant: str
    lr: float
    kv_bytes_per_token: int
    params: int
    ppls: list[float]
    tokens_per_s: float

    @property
    def mean(self) -> float:
        """Mean validation perplexity over seeds."""
        return statistics.fmean(self.ppls)

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (0 for one seed)."""
        return statistics.stdev(self.ppls) if len(self.ppls) > 1 else 0.0


def aggregate(rows: list[dict[str, Any]], main_only: bool = True) -> list[VariantStats]:
    """Group result rows by (variant, lr), in first-appearance order."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        if row["main"] or not main_only:
            groups.setdefault((row["variant"], row["lr"]), []).append(row)
    return [
        VariantStats(
            variant=variant,
            lr=lr,
            kv_bytes_per_token=members[0]["kv_bytes_per_token"],
            params=members[0]["params"],
            ppls=[m["val_ppl"] for m in members],
            tokens_per_s=statistics.fmean(m["tokens_per_s"] for m in members),
        )
        for (variant, lr), members in groups.items()
    ]


def check_claim(better: VariantStats, worse: VariantStats) -> tuple[bool, str]:
    """Does ``better`` have the lower mean perplexity, and by more than the seed spread?

    "Beyond seed spread" means the seed ranges do not overlap; with overlapping ranges the
    ordering is reported as within noise whichever way the means fall.
    """
    held = better.mean < worse.mean
    separated = max(better.ppls) < min(worse.ppls) or max(worse.ppls) < min(better.ppls)
    diff = worse.mean - better.mean
    spread = max(better.std, worse.std)
    verdict = ("held" if held else "did NOT hold") + (
        ", beyond seed spread" if separated else ", within seed spread (inconclusive)"
    )
    return held and separated, f"{verdict}: difference {diff:+.2f} PPL, seed std up to {spread:.2f}"


def _pareto(stats: list[VariantStats]) -> list[VariantStats]:
    front, best = [], math.inf
    for s in sorted(stats, key=lambda s: (s.kv_bytes_per_token, s.mean)):
        if s.mean < best:
            front.append(s)
            best = s.mean
    return front


def plot(stats: list[VariantStats], path: Path, title: str) -> Path:
    """Two panels: our variants (mean, seed range, Pareto front) and the paper's 1B points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ours, paper) = plt.subplots(1, 2, figsize=(12, 4.8))
    for s in stats:
        low, high = s.mean - min(s.ppls), max(s.ppls) - s.mean
        color = "tab:blue" if "CLA" in s.variant else "tab:orange"
        ours.errorbar(
            s.kv_bytes_per_token, s.mean, yerr=[[low], [high]], fmt="o", capsize=3, color=color
        )
        ours.annotate(
            s.variant,
            (s.kv_bytes_per_token, s.mean),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    front = _pareto(stats)
    ours.plot(
        [s.kv_bytes_per_token for s in front],
        [s.mean for s in front],
        "--",
        color="gray",
        label="Pareto front (means)",
    )
    ours.set(
        xscale="log",
        xlabel="KV cache bytes/token (16-bit)",
        ylabel="validation perplexity",
        title=f"{title}: mean and seed range",
    )
    ours.legend(fontsize=8)
    for name, (kv, ppl) in PAPER_1B.items():
        color = "tab:blue" if "CLA" in name else "tab:orange"
        paper.scatter(kv, ppl, color=color)
        paper.annotate(name, (kv, ppl), textcoords="offset points", xytext=(5, 4), fontsize=7)
    paper.set(
        xscale="log",
        xlabel="KV cache bytes/token (16-bit)",
        ylabel="validation perplexity",
        title="Paper, 1B models, 30B tokens (Table 1)",
    )
    for ax in (ours, paper):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _variant_table(stats: list[VariantStats]) -> list[str]:
    lines = [
        "| variant | KV bytes/token | params | seeds | val PPL mean ± std | min – max | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in sorted(stats, key=lambda s: (s.kv_bytes_per_token, s.mean)):
        lines.append(
            f"| {s.variant} | {s.kv_bytes_per_token:,} | {s.params:,} | {len(s.ppls)} | "
            f"{s.mean:.2f} ± {s.std:.2f} | {min(s.ppls):.2f} – {max(s.ppls):.2f} | "
            f"{s.tokens_per_s:,.0f} |"
        )
    return lines


def _claims(grid: Grid, stats: list[VariantStats]) -> list[str]:
    by_name = {s.variant: s for s in stats}
    lines = []
    for claim in grid.claims:
        better, worse = by_name.get(claim["better"]), by_name.get(claim["worse"])
        if better is None or worse is None:
            lines.append(f"- {claim['better']} < {claim['worse']}: not run yet")
            continue
        _, verdict = check_claim(better, worse)
        paper = f" (paper: {claim['paper']})" if "paper" in claim else ""
        lines.append(
            f"- {claim['better']} ({better.mean:.2f}) better than {claim['worse']} "
            f"({worse.mean:.2f}){paper}: **{verdict}**"
        )
    return lines


def _matched_seeds(rows: list[dict[str, Any]], swept: list[str]) -> list[int]:
    """Seeds run at every learning rate of every swept variant (so LRs are compared fairly)."""
    cells: dict[tuple[str, float], set[int]] = {}
    for row in rows:
        if row["variant"] in swept:
            cells.setdefault((row["variant"], row["lr"]), set()).add(row["seed"])
    return sorted(set.intersection(*cells.values()))


def _lr_table(rows: list[dict[str, Any]]) -> list[str]:
    swept = sorted({r["variant"] for r in rows if not r["main"]})
    if not swept:
        return []
    seeds = _matched_seeds(rows, swept)
    stats = aggregate(
        [r for r in rows if r["variant"] in swept and r["seed"] in seeds], main_only=False
    )
    lrs = sorted({s.lr for s in stats})
    lines = [
        f"Seeds {seeds} (those run at every learning rate).",
        "",
        "| variant | " + " | ".join(f"LR {lr:g}" for lr in lrs) + " | best LR |",
        "|---|" + "---|" * (len(lrs) + 1),
    ]
    for variant in swept:
        cells = {s.lr: s for s in stats if s.variant == variant}
        best = min(cells.values(), key=lambda s: s.mean)
        row = [f"{cells[lr].mean:.2f} ± {cells[lr].std:.2f}" if lr in cells else "–" for lr in lrs]
        lines.append(f"| {variant} | " + " | ".join(row) + f" | {best.lr:g} |")
    return lines


def write_report(
    grid: Grid,
    rows: list[dict[str, Any]],
    out: Path,
    command: Optional[str] = None,
    hardware: Optional[str] = None,
) -> Path:
    """Write ``pareto.png`` and ``report.md`` into ``out``; returns the Markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    stats = aggregate(rows)
    plot(stats, out / "pareto.png", grid.name)
    lines = [f"# Sweep `{grid.name}`", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    if hardware:
        lines += [f"Hardware: {hardware}", ""]
    lines += ["![Pareto plot](pareto.png)", "", "## Variants (base learning rate)", ""]
    lines += _variant_table(stats)
    claims = _claims(grid, stats)
    if claims:
        lines += ["", "## The paper's orderings, here", ""] + claims
    lr_lines = _lr_table(rows)
    if lr_lines:
        lines += ["", "## Learning-rate sensitivity (val PPL mean ± std over seeds)", ""] + lr_lines
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def load_results(directory: Path) -> list[dict[str, Any]]:
    """The result rows a sweep wrote to ``directory/results.json``; ``ValueError`` when a run's
    validation perplexity is not finite (a diverged run would distort every mean)."""
    rows = json.loads((Path(directory) / "results.json").read_text())
    bad = [r for r in rows if not math.isfinite(r["val_ppl"])]
    if bad:
        raise ValueError(f"non-finite validation perplexity in {len(bad)} run(s): {bad[:2]}")
    return rows
