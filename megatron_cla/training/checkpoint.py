"""Distributed checkpoints of a run: model, optimizer, scheduler, RNG and data position.

Layout under the checkpoint directory::

    iter_0000100/          megatron.core.dist_checkpointing files + cla_complete.json
    iter_0000200.partial/  a save in progress (or one that was killed): never loaded
    latest                 the newest complete iteration (replaced atomically)

A save writes into ``iter_N.partial``; only when every rank has finished does rank 0 write
``cla_complete.json`` (the sha256 of every file) and rename the directory to ``iter_N``. A
killed save therefore never replaces or damages the previous checkpoint, and a checkpoint whose
files no longer match their checksums is reported as corrupt instead of being loaded.

Resuming at the same parallel layout restores everything, RNG streams included, so the loss curve
continues bit for bit (on CPU). Resuming at another TP/PP layout reshards model and optimizer
(Megatron's dist-checkpoint format) and reseeds the RNG streams, which only matters with dropout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megatron_cla.training.model import unwrap

__all__ = ["TrainState", "Checkpointer", "CorruptCheckpoint"]

log = logging.getLogger(__name__)
MARKER = "cla_complete.json"
MEGATRON_LM_TRACKER = "latest_checkpointed_iteration.txt"
# Distributed-optimizer state in a layout any DP/TP/PP size can load (Megatron's default
# "fully_sharded_model_space" uses flattened ranges that the torch_dist format cannot store).
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class TrainState:
    """Where a run is: optimizer steps taken and training samples consumed."""

    iteration: int = 0
    consumed_samples: int = 0


class CorruptCheckpoint(RuntimeError):
    """A complete-looking checkpoint whose files do not match their recorded checksums."""


def _layout() -> dict[str, int]:
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(with_context_parallel=True),
    }


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state: Optional[dict]) -> ShardedObject:
    layout = _layout()
    return ShardedObject(
        "rng_state",
        state,
        (layout["pp"], layout["tp"], layout["dp"]),
        (
            ps.get_pipeline_model_parallel_rank(),
            ps.get_tensor_model_parallel_rank(),
            ps.get_data_parallel_rank(with_context_parallel=True),
        ),
        replica_id=0,
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checksums(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): _sha256(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def _model_state(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _restore_models(loaded: dict[str, Any], chunks: list, path: str) -> None:
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        result = unwrap(chunk).load_state_dict(loaded[key], strict=False)
        problems = [
            k
            for k in [*result.missing_keys, *result.unexpected_keys]
            if not k.endswith("_extra_state")
        ]
        if problems:
            raise RuntimeError(f"checkpoint {path} does not fit this model: {problems[:5]}")


class Checkpointer:
    """Saves and restores a run in ``directory`` (see the module docstring)."""

    def __init__(self, directory: Path, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.keep = max(1, keep)

    def path(self, iteration: int) -> Path:
        """Directory of a complete checkpoint."""
        return self.directory / f"iter_{iteration:07d}"

    def _megatron_lm_layout(self) -> bool:
        """The directory holds Megatron-LM's checkpoints, not the launcher's."""
        return (self.directory / MEGATRON_LM_TRACKER).is_file()

    def complete_iterations(self) -> list[int]:
        """Iterations with a complete checkpoint, oldest first (partial ones are reported)."""
        found = []
        for entry in sorted(self.directory.glob("iter_*")):
            if entry.suffix == ".partial" or not (entry / MARKER).is_file():
                if not self._megatron_lm_layout():
                    log.warning("ignoring %s: the save did not finish (no %s)", entry, MARKER)
                continue
            found.append(int(entry.name.split("_")[1]))
        return found

    def save(
        self, state: TrainState, chunks: list, optimizer: Any, scheduler: Any, config: dict
    ) -> Path:
        """Save on all ranks (collective); returns the final checkpoint directory."""
        sharded = _model_state(chunks)
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, metadata=_OPTIMIZER_FORMAT)
        sharded["rng_state"] = _rng_sharded_object(_rng_state())
        sharded["scheduler"] = scheduler.state_dict()
        return self._write(state, sharded, config)

    def save_weights(self, state: TrainState, chunks: list, config: dict) -> Path:
        """Save the model alone (no optimizer, scheduler or RNG state; collective). A run that
        resumes from it starts at ``state`` with a fresh optimizer: fine-tuning an imported
        model (``megatron-cla import-hf``)."""
        return self._write(state, _model_state(chunks), config, weights_only=True)

    def _write(
        self, state: TrainState, sharded: dict, config: dict, weights_only: bool = False
    ) -> Path:
        final = self.path(state.iteration)
        partial = final.with_name(final.name + ".partial")
        if dist.get_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        dist.barrier()
        sharded.update(
            iteration=state.iteration,
            consumed_samples=state.consumed_samples,
            layout=_layout(),
            config=config,
            weights_only=weights_only,
        )
        dist_checkpointing.save(sharded, str(partial))
        dist.barrier()
        if dist.get_rank() == 0:
            marker = {"iteration": state.iteration, "files": _checksums(partial)}
            (partial / MARKER).write_text(json.dumps(marker, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            tmp = self.directory / "latest.tmp"
            tmp.write_text(f"{state.iteration}\n")
            os.replace(tmp, self.directory / "latest")
            for old in self.complete_iterations()[: -self.keep]:
                shutil.rmtree(self.path(old), ignore_errors=True)
        dist.barrier()
        return final

    def verify(self, iteration: int) -> None:
        """Raise ``CorruptCheckpoint`` if any file differs from its recorded checksum."""
        path = self.path(iteration)
        recorded = json.loads((path / MARKER).read_text())["files"]
        actual = _checksums(path)
        bad = sorted(k for k in set(recorded) | set(actual) if recorded.get(k) != actual.get(k))
        if bad:
            older = [i for i in self.complete_iterations() if i < iteration]
            hint = (
                f"resume from the previous complete checkpoint with "
                f"checkpoint.load_iteration={older[-1]}"
                if older
                else "start from scratch"
            )
            raise CorruptCheckpoint(
                f"checkpoint {path} is corrupt: {len(bad)} file(s) differ from their recorded "
                f"checksums ({bad[:3]}{' ...' if len(bad) > 3 else ''}); {hint}."
            )

    def latest_complete(self) -> int:
        """The newest complete iteration; ``FileNotFoundError`` if there is none."""
        complete = self.complete_iterations()
        if not complete and self._megatron_lm_layout():
            raise FileNotFoundError(
                f"{self.directory} holds Megatron-LM checkpoints ({MEGATRON_LM_TRACKER}), not "
                f"the ones megatron-cla pretrain writes (iter_NNNNNNN/ with {MARKER})"
            )
        if not complete:
            raise FileNotFoundError(
                f"no complete checkpoint in {self.directory} (expected iter_NNNNNNN/ with "
                f"{MARKER}, as written by megatron-cla pretrain)"
            )
        return complete[-1]

    def saved_run(self, iteration: int) -> dict[str, Any]:
        """What a checkpoint says about its run: ``config`` (the pretraining config as a dict),
        ``layout`` (TP/PP/DP at save time), ``iteration``, ``consumed_samples``."""
        return dist_checkpointing.load_common_state_dict(str(self.path(iteration)))

    def saved_vocab_size(self, iteration: int) -> int:
        """Rows of the saved (padded) word embedding."""
        metadata = dist_checkpointing.load_tensors_metadata(str(self.path(iteration)))
        return metadata["embedding.word_embeddings.weight"].global_shape[0]

    def load_weights(self, iteration: int, chunks: list) -> None:
        """Load only the model of a complete checkpoint (any saved TP/PP layout); collective."""
        self.verify(iteration)
        path = str(self.path(iteration))
        loaded = dist_checkpointing.load(_model_state(chunks), path)
        _restore_models(loaded, chunks, path)

    def is_weights_only(self, iteration: int) -> bool:
        """True for a checkpoint written by :meth:`save_weights`."""
        return bool(self.saved_run(iteration).get("weights_only", False))

    def load(self, iteration: int, chunks: list, optimizer: Any, scheduler: Any) -> TrainState:
        """Restore a complete checkpoint into the (already built) run; collective. A
        weights-only checkpoint restores the model and leaves optimizer and scheduler fresh."""
        self.verify(iteration)
        path = str(self.path(iteration))
        common = dist_checkpointing.load_common_state_dict(path)
        if common.get("weights_only", False):
            self.load_weights(iteration, chunks)
            return TrainState(common["iteration"], common["consumed_samples"])
        same_layout = common["layout"] == _layout()
        sharded = _model_state(chunks)
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded, is_loading=True, metadata=_OPTIMIZER_FORMAT
        )
        if same_layout:
            sharded["rng_state"] = _rng_sharded_object(None)
        loaded = dist_checkpointing.load(sharded, path)
        _restore_models(loaded, chunks, path)
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["scheduler"])
        if same_layout:
            _set_rng_state(loaded["rng_state"])
        elif dist.get_rank() == 0:
            log.warning(
                "parallel layout changed %s -> %s: model and optimizer resharded, RNG "
                "streams reseeded",
                common["layout"],
                _layout(),
            )
        return TrainState(loaded["iteration"], loaded["consumed_samples"])
