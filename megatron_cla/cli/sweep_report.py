"""``megatron-cla sweep-report --grid G.yaml --results DIR --out D``: a sweep's report.

Writes ``pareto.png`` (validation perplexity vs KV bytes/token, with the paper's 1B points) and
``report.md`` (per-variant table, the grid's claims checked against the seed spread, LR table);
see :mod:`megatron_cla.experiments.report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_cla.cli.common import command_parser, user_errors

__all__ = ["main"]


def main(argv: Optional[list[str]] = None) -> None:
    parser = command_parser("sweep-report")
    parser.add_argument("--grid", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True, help="the sweep's output dir")
    parser.add_argument("--out", type=Path, required=True, help="where report.md/pareto.png go")
    parser.add_argument("--command", default=None, help="how the results were produced")
    parser.add_argument("--hardware", default=None, help="what they were produced on")
    args = parser.parse_args(argv)
    from megatron_cla.experiments.report import load_results, write_report
    from megatron_cla.experiments.sweep import load_grid

    with user_errors("sweep-report"):
        rows = load_results(args.results)
        path = write_report(load_grid(args.grid), rows, args.out, args.command, args.hardware)
    print(f"wrote {path} and {args.out / 'pareto.png'}")
