"""Report of an uptraining study: ``report.md`` (tables of validation perplexity over the seeds,
comparisons that do or do not hold beyond the seed spread) and ``uptraining.png`` (validation
perplexity against uptraining tokens, one line per K/V init and method, with the source model and
the CLA model trained from scratch as references)."""

from __future__ import annotations

import itertools
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_cla.experiments.uptrain_study import StudyPlan

__all__ = ["Spread", "group_results", "compare", "write_uptrain_report"]


@dataclass
class Spread:
    """Validation perplexities of one point over the seeds."""

    ppls: list[float]

    @property
    def mean(self) -> float:
        """Mean over the seeds."""
        return statistics.fmean(self.ppls)

    @property
    def low(self) -> float:
        """Lowest seed."""
        return min(self.ppls)

    @property
    def high(self) -> float:
        """Highest seed."""
        return max(self.ppls)

    def __str__(self) -> str:
        return f"{self.mean:.2f} [{self.low:.2f}, {self.high:.2f}]"


def group_results(rows: list[dict[str, Any]]) -> dict[tuple, Spread]:
    """Spreads keyed ``("source",)``, ``("scratch",)`` or ``(init, method, fraction)``."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        if row["model"] == "uptrain":
            key = (row["init"], row["method"], row["fraction"])
        else:
            key = (row["model"],)
        groups[key].append(row["val_ppl"])
    return {key: Spread(values) for key, values in groups.items()}


def compare(name_a: str, a: Spread, name_b: str, b: Spread) -> str:
    """One sentence: which is lower, and whether the seed ranges separate them."""
    better, worse = ((name_a, a), (name_b, b)) if a.mean <= b.mean else ((name_b, b), (name_a, a))
    if min(len(a.ppls), len(b.ppls)) < 2:
        verdict = "one seed, no spread to judge by (not established)"
    elif better[1].high < worse[1].low:
        verdict = "beyond the seed spread"
    else:
        verdict = "within the seed spread (not established)"
    return f"{better[0]} {better[1].mean:.2f} < {worse[0]} {worse[1].mean:.2f}: {verdict}"


def _table(plan: StudyPlan, spreads: dict[tuple, Spread]) -> list[str]:
    steps = plan.fraction_steps()
    head = [
        "K/V init",
        "method",
        "before",
        *(f"{f:.0%} ({s} steps)" for f, s in zip(plan.fractions, steps, strict=True)),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for init, method in itertools.product(plan.kv_inits, plan.methods):
        cells = [str(spreads.get((init, method, f), "n/a")) for f in [0.0, *plan.fractions]]
        lines.append(f"| {init} | {method} | " + " | ".join(cells) + " |")
    return lines


def _comparisons(plan: StudyPlan, spreads: dict[tuple, Spread]) -> list[str]:
    last = plan.fractions[-1]
    out = []
    for init, method in itertools.product(plan.kv_inits, plan.methods):
        point = spreads.get((init, method, last))
        if point is None:
            continue
        for ref in ("source", "scratch"):
            if (ref,) in spreads:
                out.append(compare(f"{init}/{method} at {last:.0%}", point, ref, spreads[(ref,)]))
    for fraction in plan.fractions:
        for init in plan.kv_inits:
            for a, b in itertools.combinations(plan.methods, 2):
                pa, pb = spreads.get((init, a, fraction)), spreads.get((init, b, fraction))
                if pa and pb:
                    out.append(compare(f"{init}/{a}", pa, f"{init}/{b}", pb) + f" ({fraction:.0%})")
        if len(plan.kv_inits) == 2:
            for method in plan.methods:
                pa, pb = (spreads.get((i, method, fraction)) for i in plan.kv_inits)
                if pa and pb:
                    names = [f"{i}/{method}" for i in plan.kv_inits]
                    out.append(compare(names[0], pa, names[1], pb) + f" ({fraction:.0%})")
    return [f"* {line}" for line in out]


def plot(plan: StudyPlan, spreads: dict[tuple, Spread], tokens_per_step: int, path: Path) -> Path:
    """Validation perplexity against uptraining tokens (mean and seed range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    tokens = [0, *(s * tokens_per_step for s in plan.fraction_steps())]
    for init, method in itertools.product(plan.kv_inits, plan.methods):
        points = [spreads.get((init, method, f)) for f in [0.0, *plan.fractions]]
        if any(p is None for p in points):
            continue
        means = [p.mean for p in points]
        errors = [
            [m - p.low for m, p in zip(means, points, strict=True)],
            [p.high - m for m, p in zip(means, points, strict=True)],
        ]
        ax.errorbar(tokens, means, yerr=errors, marker="o", capsize=3, label=f"{init} / {method}")
    for ref, style in (("source", "k--"), ("scratch", "r:")):
        if (ref,) in spreads:
            label = "source (no CLA)" if ref == "source" else f"CLA{plan.share_factor} from scratch"
            ax.axhline(spreads[(ref,)].mean, color=style[0], linestyle=style[1:], label=label)
    ax.set(
        xlabel="uptraining tokens",
        ylabel="validation perplexity",
        yscale="log",
        title=f"{plan.name}: CLA{plan.share_factor} conversions, uptrained",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_uptrain_report(plan: StudyPlan, rows: list[dict[str, Any]], out: Path) -> Path:
    """Write ``report.md`` and ``uptraining.png`` into ``out``; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    spreads = group_results(rows)
    seeds = sorted({row["seed"] for row in rows})
    lines = [
        f"# Uptraining study `{plan.name}`",
        "",
        f"Seeds {seeds}; validation perplexity as mean [lowest, highest] over the seeds.",
        f"Pretraining: {plan.pretrain_iters} steps of {plan.tokens_per_step:,} tokens.",
        "",
    ]
    for ref in ("source", "scratch"):
        if (ref,) in spreads:
            lines.append(f"* {ref}: {spreads[(ref,)]}")
    lines += ["", *_table(plan, spreads), "", "## Comparisons", "", *_comparisons(plan, spreads)]
    plot(plan, spreads, plan.tokens_per_step, out / "uptraining.png")
    lines += ["", "![validation perplexity vs uptraining tokens](uptraining.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
