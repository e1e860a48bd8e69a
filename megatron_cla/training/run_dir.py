"""What the commands need to know about a launcher run directory.

A run directory (``logging.run_dir``) holds ``config.yaml`` and ``checkpoints/iter_NNNNNNN``;
every checkpoint also carries the run's config. Serving (``generate``, ``export-hf``) and
conversion (``convert``) find a checkpoint in it, read the saved config, re-lay it out for one
machine and find the run's tokenizer with these functions.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Optional

from megatron_cla.training.config import PretrainConfig, config_from_dict

__all__ = ["copy_run", "find_checkpoint", "serving_config", "run_tokenizer_path"]


def find_checkpoint(path: Path, iteration: Optional[int] = None) -> tuple[Any, int]:
    """The ``Checkpointer`` and iteration for a run directory, a checkpoint directory, or an
    ``iter_NNNNNNN`` directory (newest complete one unless ``iteration`` is given)."""
    from megatron_cla.training.checkpoint import Checkpointer

    path = Path(path)
    if path.name.startswith("iter_"):
        if iteration is not None and int(path.name.split("_")[1]) != iteration:
            raise ValueError(f"--checkpoint {path} and --iteration {iteration} disagree")
        return Checkpointer(path.parent), int(path.name.split("_")[1].split(".")[0])
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    checkpointer = Checkpointer(path)
    if iteration is None:
        return checkpointer, checkpointer.latest_complete()
    if iteration not in checkpointer.complete_iterations():
        raise FileNotFoundError(f"no complete checkpoint iter_{iteration:07d} in {path}")
    return checkpointer, iteration


def serving_config(
    saved: dict[str, Any], tensor_parallel: int, precision: str = "auto"
) -> PretrainConfig:
    """The saved pretraining config re-laid-out for serving on ``tensor_parallel`` ranks."""
    cfg = config_from_dict(saved)
    cfg.parallel = dataclasses.replace(
        cfg.parallel,
        tensor=tensor_parallel,
        pipeline=1,
        virtual_pipeline=None,
        pipeline_layout=None,
        context=1,
        sequence_parallel=False,
        distributed_optimizer=False,
    )
    cfg.train = dataclasses.replace(
        cfg.train,
        global_batch_size=cfg.train.micro_batch_size,
        precision=precision,
        recompute_granularity=None,
        recompute_method=None,
        recompute_num_layers=None,
    )
    pattern = cfg.model.hybrid_layer_pattern  # one pipeline stage: no segment separators
    pattern = None if pattern is None else pattern.replace("|", "")
    cfg.model = dataclasses.replace(cfg.model, dropout=0.0, hybrid_layer_pattern=pattern)
    return cfg


def run_tokenizer_path(cfg: PretrainConfig, override: Optional[Path] = None) -> Path:
    """A run's tokenizer (a SentencePiece ``.model`` or a Hugging Face tokenizer directory):
    ``override``, else ``data.tokenizer`` (imported and converted runs), else the one of the data
    directory (``tokenizer.model`` or ``tokenizer/``)."""
    from megatron_cla.data.tokenizer import is_hf_tokenizer

    data = Path(cfg.data.dir)
    if override is not None:
        candidates = [Path(override)]
    elif cfg.data.tokenizer is not None:
        candidates = [Path(cfg.data.tokenizer)]
    else:
        candidates = [data / "tokenizer.model", data / "tokenizer"]
    for path in candidates:
        if (path.is_file() and path.suffix == ".model") or is_hf_tokenizer(path):
            return path
    raise FileNotFoundError(
        f"no tokenizer at {candidates[0]}; pass --tokenizer (a SentencePiece .model file or a "
        f"Hugging Face tokenizer directory)"
    )


def copy_run(source: Path, to: Path) -> Path:
    """A copy of the run directory ``source`` at ``to`` (which must not exist) whose
    ``config.yaml`` names ``to`` wherever it named ``source`` (its run directory, a tokenizer kept
    inside it), so that training the copy writes only into ``to``."""
    shutil.copytree(source, to)
    config = to / "config.yaml"
    text = config.read_text().replace(str(Path(source).resolve()), str(Path(to).resolve()))
    config.write_text(text)
    return to
