"""Training checkpoints: written atomically, every N steps and at each epoch end, read back with
`weights_only=True`, and found again for `--resume`."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..util import atomic_write

__all__ = ["LATEST", "AtomicCheckpointIO", "PeriodicCheckpoint", "adopt_step_progress", "checkpoint_step",
           "resolve_resume"]

# Where Lightning's fit loop counts optimizer steps, for each kind of optimisation.
_MANUAL_STEPS = "epoch_loop.manual_optimization.optim_step_progress"
_AUTOMATIC_STEPS = "epoch_loop.automatic_optimization.optim_progress"

LATEST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file in the same folder, flushed, then renamed over the target, so a
    kill at any moment leaves the previous checkpoint intact; read back with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_write(path, lambda handle: torch.save(checkpoint, handle))

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


class PeriodicCheckpoint(Callback):
    """`last.ckpt` every N optimizer steps and at each epoch end, plus `epoch-E.ckpt` (the newest `keep`)."""

    def __init__(self, folder: Path, every_steps: int, keep_epochs: int = 1):
        self.folder, self.every_steps, self.keep_epochs = Path(folder), every_steps, keep_epochs

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.every_steps > 0 and trainer.global_step % self.every_steps == 0:
            _save(trainer, self.folder / LATEST)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _save(trainer, self.folder / LATEST)
        if self.keep_epochs > 0:
            _save(trainer, self.folder / f"epoch-{trainer.current_epoch}.ckpt")
            if trainer.is_global_zero:
                for old in sorted(self.folder.glob("epoch-*.ckpt"), key=_epoch_of)[:-self.keep_epochs]:
                    old.unlink(missing_ok=True)


def _save(trainer: L.Trainer, path: Path) -> None:
    trainer.save_checkpoint(path, weights_only=False)  # the full training state: optimizer, loops, RNG


def _epoch_of(path: Path) -> int:
    return int(path.stem.split("-")[1])


def resolve_resume(resume: str | None, output: Path) -> str | None:
    """A checkpoint path for `--resume latest|PATH` (None: start fresh)."""
    if not resume:
        return None
    path = output / "checkpoints" / LATEST if resume == "latest" else Path(resume)
    if not path.is_file():
        raise ValueError(f"cannot resume: no checkpoint at {path}" +
                         ("; run without --resume to start a new run" if resume == "latest" else ""))
    return str(path)



def checkpoint_step(ckpt_path: str | None) -> int | None:
    """The global step a training checkpoint was written at (None for no checkpoint)."""
    if ckpt_path is None:
        return None
    return int(torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def adopt_step_progress(checkpoint: dict[str, Any], automatic: bool) -> None:
    """Carry the optimizer-step count of a checkpoint written under the other kind of optimisation over to the
    kind this run uses. Lightning keeps separate counters for automatic and manual optimisation and takes the
    global step from the one in use, so without this a run resumed from a checkpoint of an accumulating run (or of
    a clipforge version that always optimised manually) would count its steps from 0 again."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    if _MANUAL_STEPS not in loop or _AUTOMATIC_STEPS not in loop:
        return
    manual, automatic_steps = loop[_MANUAL_STEPS], loop[_AUTOMATIC_STEPS]["optimizer"]
    if automatic and not automatic_steps["step"]["total"]["completed"] and manual["total"]["completed"]:
        automatic_steps["step"] = copy.deepcopy(manual)
        automatic_steps["zero_grad"] = {part: {**counts, "started": counts["completed"]}
                                        for part, counts in manual.items()}
    elif not automatic and not manual["total"]["completed"] and automatic_steps["step"]["total"]["completed"]:
        loop[_MANUAL_STEPS] = copy.deepcopy(automatic_steps["step"])
