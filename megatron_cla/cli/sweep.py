"""``megatron-cla sweep --grid configs/sweeps/X.yaml``: train a grid of CLA variants.

Every run trains with the same data and token budget, one ``megatron-cla pretrain`` process per run;
finished runs are skipped and interrupted ones resume, so the command can be re-run until the grid
is done. ``results.csv``/``results.json`` are rewritten after every run. The grid file's format is
in :mod:`megatron_cla.experiments.sweep`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from megatron_cla.cli.common import command_parser, quiet_library_startup, user_errors

__all__ = ["main"]


def main(argv: Optional[list[str]] = None) -> None:
    parser = command_parser(
        "sweep", epilog="example:\n  megatron-cla sweep --grid configs/sweeps/cpu_small.yaml"
    )
    parser.add_argument("--grid", type=Path, required=True, help="grid YAML")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/sweeps/NAME")
    parser.add_argument(
        "--parallel", type=int, default=1, help="runs at a time (small models on one GPU)"
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    args = parser.parse_args(argv)
    quiet_library_startup()
    from megatron_cla.experiments.sweep import load_grid, plan_runs, run_sweep

    with user_errors("invalid sweep"):
        grid = load_grid(args.grid)
        out = args.out or Path("runs/sweeps") / grid.name
        runs = plan_runs(grid, out)
    print(
        f"sweep {grid.name}: {len(runs)} runs ({len(grid.variants)} variants x "
        f"{len(grid.seeds)} seeds + LR sweep) -> {out}"
    )
    if args.dry_run:
        for run in runs:
            print(f"  {run.variant} lr {run.lr:g} seed {run.seed}: {' '.join(run.overrides)}")
        return
    if args.parallel < 1:
        sys.exit(f"invalid sweep: --parallel must be >= 1, got {args.parallel}")
    run_sweep(grid, out, args.parallel)
    print(f"results: {out / 'results.csv'}")
