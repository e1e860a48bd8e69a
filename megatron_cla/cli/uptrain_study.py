"""``megatron-cla uptrain-study --plan configs/uptrain/X.yaml``: how cheaply uptraining recovers a
model converted to CLA.

Per seed: the source model, CLA from scratch on the same total tokens, the conversions and their
uptraining runs, one ``megatron-cla`` process each; finished runs are skipped, so the command can
be re-run until the study is done. Then ``report.md`` and ``uptraining.png`` are written to
``--report``. The plan file's format is in :mod:`megatron_cla.experiments.uptrain_study`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_cla.cli.common import command_parser, quiet_library_startup, user_errors

__all__ = ["main"]


def main(argv: Optional[list[str]] = None) -> None:
    parser = command_parser(
        "uptrain-study",
        epilog="example:\n  megatron-cla uptrain-study --plan configs/uptrain/cpu_small.yaml "
        "--report docs/uptraining/cpu_small",
    )
    parser.add_argument("--plan", type=Path, required=True, help="study plan YAML")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/uptrain/NAME")
    parser.add_argument("--report", type=Path, default=None, help="default: OUT/report")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    args = parser.parse_args(argv)
    quiet_library_startup()
    from megatron_cla.experiments.uptrain_report import write_uptrain_report
    from megatron_cla.experiments.uptrain_study import load_plan, plan_runs, run_study

    with user_errors("invalid study"):
        plan = load_plan(args.plan)
        out = args.out or Path("runs/uptrain") / plan.name
        runs = plan_runs(plan, out)
    print(
        f"uptrain-study {plan.name}: {len(runs)} runs ({len(plan.seeds)} seeds x (source, "
        f"scratch, {len(plan.kv_inits)} conversions x {len(plan.methods)} methods)) -> {out}"
    )
    if args.dry_run:
        for run in runs:
            print(f"  seed {run.seed} {run.directory.name}: megatron-cla {' '.join(run.argv)}")
        return
    with user_errors("uptrain-study", RuntimeError):  # a failed run: one line naming its log
        rows = run_study(plan, out)
    report = write_uptrain_report(plan, rows, args.report or out / "report")
    print(f"report: {report}")
