"""``megatron-cla pretrain --config X.yaml [section.key=value ...]``.

Run it directly (one process; CPU or one GPU) or under torchrun (any number of processes and
nodes; see ``launch/``): ``torchrun --nproc-per-node 8 -m megatron_cla pretrain --config X``. The
config is checked against the world size before Megatron allocates anything; the job itself is
:func:`megatron_cla.training.pretraining.run_pretraining`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from megatron_cla.cli.common import command_parser, quiet_library_startup, user_errors

__all__ = ["main"]

EXAMPLES = """examples:
  megatron-cla pretrain --config configs/tiny_mqa_cla2.yaml
  megatron-cla pretrain --config configs/tiny_mqa_cla2.yaml train.train_iters=50 train.lr=1e-3
  torchrun --nproc-per-node 2 -m megatron_cla pretrain --config X.yaml parallel.tensor=2"""


def main(argv: Optional[list[str]] = None) -> None:
    parser = command_parser("pretrain", epilog=EXAMPLES)
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML config (configs/*.yaml); default: built-in tiny defaults",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-3")
    parser.add_argument("--verbose", action="store_true", help="show library start-up notices")
    args = parser.parse_intermixed_args(argv)  # overrides and options in any order
    quiet_library_startup(args.verbose)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from megatron_cla.training.config import load_config

    with user_errors("invalid configuration"):
        if args.config is not None and not args.config.is_file():
            raise FileNotFoundError(f"--config {args.config}: no such file")
        cfg = load_config(args.config, args.overrides)
        from megatron_cla.training.plan import make_plan

        make_plan(cfg, int(os.environ.get("WORLD_SIZE", 1)))  # fail fast, before allocation
    from megatron_cla.training.checkpoint import CorruptCheckpoint
    from megatron_cla.training.pretraining import run_pretraining

    with user_errors("pretrain", CorruptCheckpoint):
        run_pretraining(cfg)
