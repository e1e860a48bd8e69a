"""What every ``megatron-cla`` command shares: the list of commands, a quiet start, one-line errors.

Importing Megatron-Core prints about ten notices before anything useful: that Apex and
Transformer Engine are missing and torch norms/optimizers are used instead, that MimoModelConfig
is experimental, PyTorch's "No CUDA runtime is found" on a CPU; then every config warns about
Megatron's own default ``cuda_graph_modules``, every model build about GPTModel's deprecation and
the first checkpoint about Megatron's async-save internals and PyTorch's checkpoint-reader
internals. The commands hide exactly these (``--verbose`` shows them), in their own process and in
the helper processes they spawn (the checkpoint writer re-imports Megatron), and report every user
error as one line and exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

__all__ = [
    "COMMANDS",
    "Command",
    "add_cla_arguments",
    "cla_target",
    "command_parser",
    "is_first_rank",
    "one_process_command",
    "quiet_library_startup",
    "quiet_transformers",
    "user_errors",
]


@dataclass(frozen=True)
class Command:
    """One subcommand of ``megatron-cla``."""

    name: str
    """What the user types: ``megatron-cla NAME``."""
    summary: str
    """One line for ``megatron-cla --help`` and the top of the command's own ``--help``."""

    @property
    def module(self) -> str:
        """The module of :mod:`megatron_cla.cli` whose ``main(argv)`` runs it."""
        return self.name.replace("-", "_")


COMMANDS = (
    Command("pretrain", "train a CLA model from a YAML config (one process or torchrun)"),
    Command("generate", "generate text from a run's checkpoint (Megatron inference)"),
    Command("export-hf", "write a run as a Hugging Face model (transformers, vLLM)"),
    Command("import-hf", "a Hugging Face model (ours, Llama, Mistral, Qwen) as a run"),
    Command("convert", "convert a run: to CLA (to-cla) or to a HybridModel (gpt-to-hybrid)"),
    Command("kv-budget", "KV cache per token, per sequence and concurrency on a GPU"),
    Command("prepare-data", "train a tokenizer and write Megatron datasets from text"),
    Command("sweep", "train a grid of CLA variants on the same data and token budget"),
    Command("sweep-report", "Pareto plot and claims report of a sweep's results"),
    Command("uptrain-study", "pretrain, convert to CLA and uptrain: recovery against tokens"),
    Command("build-corpus", "rebuild the embedded corpus from its packages"),
)
"""Every subcommand, in the order ``megatron-cla --help`` lists them."""


def command_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """The argument parser of ``megatron-cla NAME``, described by its summary line."""
    summary = next(c.summary for c in COMMANDS if c.name == name)
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    return argparse.ArgumentParser(
        prog=f"megatron-cla {name}", description=summary[0].upper() + summary[1:] + ".", **kwargs
    )


def add_cla_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that convert a model to CLA (``convert to-cla``, ``import-hf``)."""
    parser.add_argument(
        "--cla-share-factor", type=int, default=None, help="S: producers at layers 1, S+1, ..."
    )
    parser.add_argument(
        "--cla-producer-layers", default=None, help="explicit 1-based producers, e.g. 1,2,4,6"
    )
    parser.add_argument(
        "--kv-init",
        choices=("mean", "first"),
        default="mean",
        help="a producer's K/V: the mean over its group (default) or its own",
    )
    parser.add_argument(
        "--query-groups", type=int, default=None, help="mean-pool the K/V heads to G first"
    )


def cla_target(args: argparse.Namespace) -> Any:
    """The ``CLATarget`` the options of :func:`add_cla_arguments` ask for, or None if none."""
    from megatron_cla.conversion.to_cla import CLATarget

    producers = args.cla_producer_layers
    if producers is not None:
        try:
            producers = tuple(int(x) for x in producers.split(","))
        except ValueError:
            raise ValueError(
                f"--cla-producer-layers {args.cla_producer_layers!r}: write 1-based layer "
                f"numbers separated by commas, e.g. 1,2,4,6"
            ) from None
    if args.cla_share_factor is None and producers is None and args.query_groups is None:
        return None
    return CLATarget(args.cla_share_factor, producers, args.kv_init, args.query_groups)


NOTICES = (
    "Apex is not installed",
    "Transformer Engine and Apex are not installed",
    "Only transformer-engine>=",
    "MimoModelConfig is experimental",
    "'pin_memory' argument is set as true but no accelerator is found",
    "full scope is deprecated",
    "torch.distributed is disabled, unavailable or uninitialized",
    "The argument order of load has been changed",
    "Please use DTensor instead and we are deprecating ShardedTensor",
    "`load_state_dict` is deprecated and will be removed",  # megatron-core 0.16.1's loader
)
"""Starts of the import-time warnings about optional accelerators that the commands hide."""

QUIET_LOGGERS = ("torch.utils.cpp_extension", "megatron.core.models.gpt.gpt_model")
"""Loggers of "No CUDA runtime is found" and of GPTModel's deprecation notice."""

QUIET_RECORDS = {"megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is"}
"""Logger -> start of the one record of it that is hidden."""


class _DropRecord(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def quiet_library_startup(verbose: bool = False) -> None:
    """Hide Megatron's and PyTorch's accelerator notices (see the module docstring) here and in
    processes spawned from here; call it before Megatron-Core is imported."""
    if verbose:
        return
    for notice in NOTICES:
        warnings.filterwarnings("ignore", message=f"^{notice}")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, start in QUIET_RECORDS.items():
        logging.getLogger(name).addFilter(_DropRecord(start))
    inherited = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    # -W entries are comma-separated and match the start of a message: cut at the first comma
    ours = [f"ignore:{n.split(',')[0]}" for n in NOTICES]
    os.environ["PYTHONWARNINGS"] = ",".join(inherited + ours)
    os.environ.setdefault("TORCH_LOGS", "-torch")  # torch's own loggers: errors only


def quiet_transformers(verbose: bool = False) -> None:
    """transformers' and huggingface_hub's notices and progress bars off (errors stay); call it
    before transformers is imported."""
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@contextlib.contextmanager
def user_errors(prog: str, *kinds: type[BaseException]) -> Iterator[None]:
    """Turn configuration and input errors into ``prog: message`` on one line, exit status 1."""
    import yaml

    try:
        yield
    except (ValueError, FileNotFoundError, IsADirectoryError, yaml.YAMLError, *kinds) as err:
        if isinstance(err, OSError) and err.filename is not None and err.strerror:
            message = f"{err.strerror.lower()}: {err.filename}"
        else:
            message = " ".join(str(err).split()) or type(err).__name__
        sys.exit(f"{prog}: {message}" if is_first_rank() else 1)  # every rank has the error


def is_first_rank() -> bool:
    """Whether this process prints a command's results (rank 0, or no torchrun)."""
    return int(os.environ.get("RANK", 0)) == 0


@contextlib.contextmanager
def one_process_command(
    prog: str, verbose: bool = False, on_gpu: bool = False, torchrun: bool = False
) -> Iterator[None]:
    """The body of a command that rewrites weights (``export-hf``, ``import-hf``, ``convert``): a
    quiet start, one-line errors (also for missing optional packages; under torchrun from rank 0
    alone) and a world of one process (NCCL on a GPU, gloo on CPUs) - or, with ``torchrun``, of
    the ranks torchrun started (gloo: weights stay in CPU memory) - torn down after."""
    quiet_library_startup(verbose)
    quiet_transformers(verbose)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if int(os.environ.get("WORLD_SIZE", 1)) != 1 and not torchrun:
        sys.exit(f"{prog}: run it as one process (not under torchrun)")
    import torch.distributed as dist

    from megatron_cla.runtime.distributed import init_distributed

    try:
        with user_errors(prog, ImportError, RuntimeError):
            init_distributed(on_gpu)
            yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
