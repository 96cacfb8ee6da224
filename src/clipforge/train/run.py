"""Run assembly: config -> model, data, LightningModule, callbacks, loggers, Trainer; resume; final model.

    from clipforge.train import load_config, train
    summary = train(load_config("recipes/flickr8k-cpu.yaml", ["data.train=train.csv", "data.val=dev.csv"]))

A run folder holds ``config.yaml`` (the resolved config), ``checkpoints/last.ckpt`` (every N steps and each
epoch, written atomically) and ``epoch-E.ckpt``, ``logs/metrics.csv`` (+ TensorBoard events), ``val.jsonl``
(retrieval metrics per validation pass), ``summary.json``, and ``final/``, the trained model in clipforge's
folder format (``clipforge.load("DIR/final")``).

Several devices or machines go through Lightning (DDP or FSDP over torch.distributed); features are all-gathered
with gradient so that the negatives span the global batch. One machine with 8 GPUs::

    clipforge train --config run.yaml --devices 8 --strategy ddp

Two machines, with torchrun (run on each, NODE_RANK 0 and 1) or SLURM (``srun`` sets the ranks itself)::

    torchrun --nnodes 2 --node-rank $NODE_RANK --nproc-per-node 8 --master-addr HOST0 --master-port 29500 \
        -m clipforge.cli.train --config run.yaml --devices 8 --num-nodes 2 --strategy ddp
    srun --nodes 2 --ntasks-per-node 8 --gpus-per-node 8 clipforge train --config run.yaml --devices 8 --num-nodes 2
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ..checkpoints import save_model
from ..model import CLIP, PreprocessConfig, lightning_precision
from ..util import atomic_write_json
from .checkpointing import AtomicCheckpointIO, PeriodicCheckpoint, checkpoint_step, resolve_resume
from .config import TrainConfig, save_config
from .datamodule import CLIPDataModule, read_pairs
from .logs import ProgressBar, make_loggers
from .models import build_model
from .module import CLIPTrainingModule
from .validation import RetrievalValidation, trim_validation_log

__all__ = ["resolve_threads", "train"]


def resolve_threads(threads: int | str | None) -> int | None:
    """CPU threads for torch. `auto`: every core on an idle machine, one when the load average says the cores
    are taken: there a step on all cores runs slower than on one, its threads spinning while they wait for each
    other."""
    if threads is None or isinstance(threads, int):
        return threads
    if threads != "auto":
        raise ValueError(f"run.threads must be a number, null or 'auto', got {threads!r}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > cores / 2
    return 1 if busy else cores


def train(cfg: TrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Train (or fine-tune) a CLIP as `cfg` says; returns a summary (also written to OUTPUT/summary.json).

    `resume`: `latest` (OUTPUT/checkpoints/last.ckpt) or a checkpoint path: optimizer, schedule, step, RNG and
    data position continue where the checkpoint left them."""
    if "fsdp" in str(cfg.run.strategy).lower():
        # FSDP's flat parameters cannot hold a 0-d tensor, and OpenAI's layout makes the temperature one; better
        # this line than FSDP's traceback after the processes have started.
        raise ValueError(f"run.strategy={cfg.run.strategy} is not supported yet: FSDP cannot shard the 0-d "
                         "temperature parameter (logit_scale); use --strategy ddp (see docs/training.md)")
    output = Path(cfg.run.output)
    ckpt_path = resolve_resume(resume, output)
    precision = lightning_precision(cfg.run.precision, cfg.run.accelerator)
    threads = resolve_threads(cfg.run.threads)
    if threads:
        torch.set_num_threads(threads)
    _quiet_lightning()
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    model, preprocess, tokenizer = build_model(cfg.model)
    datamodule = CLIPDataModule(cfg, preprocess, tokenizer)
    output.mkdir(parents=True, exist_ok=True)
    save_config(cfg, output / "config.yaml")
    trim_validation_log(output / "val.jsonl", checkpoint_step(ckpt_path))  # before anything is logged
    module = CLIPTrainingModule(model, cfg.optim, cfg.loss, cfg.model, cfg.data.max_bad_fraction,
                                cfg.run.log_every_steps)
    callbacks: list[Callback] = [PeriodicCheckpoint(output / "checkpoints", cfg.run.checkpoint_every_steps,
                                                    cfg.run.keep_epoch_checkpoints)]
    if cfg.run.progress:
        callbacks.append(ProgressBar())
    validation = None
    if cfg.data.val:
        # data.kind describes the training data (e.g. wds shards); the validation set's kind is detected on its own
        validation = RetrievalValidation(read_pairs(cfg.data.val, cfg.data), preprocess, tokenizer,
                                         cfg.data.val_batch_size, cfg.data.workers, cfg.run.val_every_epochs,
                                         output / "val.jsonl", cfg.data.val_max_images)
        callbacks.insert(0, validation)  # before the epoch checkpoint, so the checkpoint follows validation
    resume_step = checkpoint_step(ckpt_path)
    trainer = L.Trainer(
        accelerator=cfg.run.accelerator, devices=cfg.run.devices, num_nodes=cfg.run.num_nodes,
        strategy=cfg.run.strategy, precision=precision, max_epochs=cfg.optim.epochs,
        max_steps=cfg.optim.max_steps or -1, logger=make_loggers(cfg, output, resume_step), callbacks=callbacks,
        enable_checkpointing=False, plugins=[AtomicCheckpointIO()], log_every_n_steps=cfg.run.log_every_steps,
        use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0,
        enable_progress_bar=cfg.run.progress, enable_model_summary=False, default_root_dir=output,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    module.bad_items.check(final=True)
    summary = {
        "steps": trainer.global_step, "epochs_completed": trainer.current_epoch,
        "train_seconds": round(module.elapsed, 1), "this_run_seconds": round(time.perf_counter() - started, 1),
        "precision": precision, "threads": torch.get_num_threads(), "bad_items": module.bad_items.summary(),
        "validation": validation.last if validation is not None else {},
        "final": str(output / "final"), "global_rank": trainer.global_rank,
    }
    if trainer.is_global_zero:
        with module.final_weights():
            _save_final(module.model, output / "final", cfg, summary, preprocess)
        atomic_write_json(output / "summary.json", summary)
    return summary


def _save_final(model: CLIP, folder: Path, cfg: TrainConfig, summary: dict[str, Any],
                preprocess: PreprocessConfig) -> None:
    # With --init the architecture is the initial checkpoint's, whatever model.arch (a default) says.
    provenance = {"trained_by": "clipforge train", "init": cfg.model.init or None,
                  "arch": None if cfg.model.init else cfg.model.arch,
                  "train_data": cfg.data.train, "steps": summary["steps"],
                  "validation": summary["validation"]}
    model.eval()
    save_model(model, folder, provenance=provenance, preprocess_cfg=preprocess)


# Lightning's warnings about choices this run makes on purpose, each with the reason it does not apply.
_EXPECTED_WARNINGS = {
    ".*does not have many workers.*": "data.workers is the user's choice (a CPU run gives its cores to the model)",
    ".*dataloader is not resumable.*": "EpochBatchSampler resumes at the checkpoint's batch itself",
    ".*Found .* module\\(s\\) in eval mode.*": "a locked tower's frozen modules keep their BatchNorm statistics",
    ".*GPU available but not used.*": "a run on --accelerator cpu asked for the CPU",
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*": "raised by Lightning's own code with this torch",
    ".*when logging on epoch level in distributed setting.*": "validation runs on rank 0 only",
    ".*Your `IterableDataset` has `__len__` defined.*": "ShardStream splits its length over the workers",
    ".*is smaller than the logging interval.*": "on a small data set logging follows the global step",
}


def _quiet_lightning() -> None:
    """Keep Lightning's console output to the progress bar: no tips, no warnings about choices made on purpose."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
