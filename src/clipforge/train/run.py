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

import csv
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from ..data.loading import (
    EpochBatchSampler,
    PairCollator,
    PairDataset,
    Pairs,
    ShardStream,
    detect_kind,
    pairs_from_folder,
    pairs_from_table,
    trim_padding,
)
from ..model import CLIP, PreprocessConfig, get_model_config, lightning_precision
from ..tokenizer import Tokenizer
from ..transforms import image_transform
from .config import DataConfig, ModelConfig, TrainConfig, save_config
from .module import CLIPTrainingModule

__all__ = ["build_model", "train"]

LATEST = "last.ckpt"


# ----------------------------------------------------------------------------------------------- model


def build_model(cfg: ModelConfig) -> tuple[CLIP, PreprocessConfig, Tokenizer]:
    """A randomly initialised CLIP of `cfg.arch` (with the size overrides), or the checkpoint `cfg.init`."""
    if cfg.init:
        return _load_init(cfg)
    arch = get_model_config(cfg.arch)
    for value, section, key in (
        (cfg.embed_dim, arch, "embed_dim"), (cfg.quick_gelu, arch, "quick_gelu"),
        (cfg.image_size, arch.vision, "image_size"), (cfg.vision_width, arch.vision, "width"),
        (cfg.vision_layers, arch.vision, "layers"), (cfg.patch_size, arch.vision, "patch_size"),
        (cfg.text_width, arch.text, "width"), (cfg.text_layers, arch.text, "layers"),
        (cfg.text_heads, arch.text, "heads"), (cfg.context_length, arch.text, "context_length"),
    ):
        if value is not None:
            setattr(section, key, value)
    model = CLIP(arch)
    return model, model.preprocess_config, Tokenizer.from_config(model.tokenizer_config())


def _load_init(cfg: ModelConfig) -> tuple[CLIP, PreprocessConfig, Tokenizer]:
    from ..checkpoints import load

    overrides = [name for name in ("embed_dim", "image_size", "vision_width", "vision_layers", "patch_size",
                                   "text_width", "text_layers", "text_heads", "context_length", "quick_gelu")
                 if getattr(cfg, name) is not None]
    if overrides:
        raise ValueError(f"model.init={cfg.init!r} fixes the architecture; remove the size overrides {overrides}")
    source, pretrained = cfg.init, None
    if not Path(source).exists() and ":" in source and not source.startswith("hf-hub:"):
        source, pretrained = source.rsplit(":", 1)  # NAME:TAG, a registered pretrained model
    model, _, tokenizer = load(source, pretrained=pretrained)
    return model.train(), model.preprocess_config, tokenizer


def resolve_threads(threads: int | str | None) -> int | None:
    """CPU threads for torch. `auto`: every core on an idle machine, one when the load average says the cores
    are taken (measured: a 2-thread step ran 3x slower than a 1-thread one on a 2-core machine with load 14,
    its threads spinning while waiting for each other)."""
    if threads is None or isinstance(threads, int):
        return threads
    if threads != "auto":
        raise ValueError(f"run.threads must be a number, null or 'auto', got {threads!r}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > cores / 2
    return 1 if busy else cores


# ----------------------------------------------------------------------------------------------- data


def read_pairs(spec: str, cfg: DataConfig, kind: str | None = None) -> Pairs:
    """Pairs from a caption table or a labelled image folder (`kind`: as `data.kind`, default auto-detect)."""
    kind = detect_kind(spec) if kind in (None, "auto") else kind
    if kind == "table":
        return pairs_from_table(spec, cfg.image_col, cfg.caption_col)
    if kind == "folder":
        return pairs_from_folder(spec, cfg.templates)
    raise ValueError(f"{spec}: {kind!r} data cannot be read as a list of pairs (use a table or an image folder)")


class CLIPDataModule(L.LightningDataModule):
    """The training loader, built once the process group exists (each rank reads its own share)."""

    def __init__(self, cfg: TrainConfig, preprocess: PreprocessConfig, tokenizer: Tokenizer):
        super().__init__()
        if not cfg.data.train:
            raise ValueError("no training data: set data.train (or --train-data) to a caption table, an image "
                             "folder or WebDataset shards")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.kind = detect_kind(cfg.data.train) if cfg.data.kind == "auto" else cfg.data.kind
        if cfg.data.captions_per_image != 1 and (self.kind == "wds" or not cfg.data.sample_captions):
            raise ValueError(f"data.captions_per_image={cfg.data.captions_per_image} needs data.sample_captions: true "
                             "and a caption table or image folder (not WebDataset shards); or set it to 1")
        if cfg.loss.caption_contrast < 0 or (cfg.loss.caption_contrast and cfg.data.captions_per_image < 2):
            raise ValueError(f"loss.caption_contrast={cfg.loss.caption_contrast} needs data.captions_per_image of 2 "
                             "or more (it contrasts the captions of each image) and a weight >= 0; or set it to 0")
        if not 0.0 <= cfg.data.word_dropout < 1.0 or (cfg.data.word_dropout and self.kind == "wds"):
            raise ValueError(f"data.word_dropout must be in [0, 1) and needs a caption table or image folder (not "
                             f"WebDataset shards); got {cfg.data.word_dropout}")
        if not 0.0 <= cfg.data.color_jitter < 1.0:
            raise ValueError(f"data.color_jitter must be in [0, 1), got {cfg.data.color_jitter}")
        if len(cfg.data.crop_scale) != 2:
            raise ValueError(f"data.crop_scale must be [low, high], got {cfg.data.crop_scale}")
        self.transform = image_transform(preprocess, is_train=cfg.data.augment, train_scale=tuple(cfg.data.crop_scale),
                                         hflip=cfg.data.hflip, color_jitter=cfg.data.color_jitter)
        # Read (and validate) the table now, in the main process, so a bad file fails before any training.
        self.pairs = None if self.kind == "wds" else read_pairs(cfg.data.train, cfg.data, self.kind)

    @property
    def batch_size(self) -> int:
        return self.cfg.optim.batch_size * max(1, self.cfg.optim.accum_freq)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        data, trainer = self.cfg.data, self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        workers = max(0, data.workers)
        common = {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": torch.cuda.is_available()}
        if self.kind == "wds":
            if not data.train_num_samples:
                raise ValueError("WebDataset training data needs data.train_num_samples (samples per epoch)")
            stream = ShardStream(data.train, self.transform, self.tokenizer, self.batch_size, data.train_num_samples,
                                 seed=self.cfg.run.seed, shuffle_buffer=data.shuffle_buffer, resampled=data.resampled,
                                 world_size=world)
            # Fresh workers each epoch: they pickle the stream again and so see its new epoch (shard order seed).
            return torch.utils.data.DataLoader(stream, batch_size=None, **{**common, "persistent_workers": False})
        dataset = PairDataset(self.pairs, self.transform, seed=self.cfg.run.seed, sample_captions=data.sample_captions,
                              captions_per_image=data.captions_per_image, word_dropout=data.word_dropout)
        sampler = EpochBatchSampler(len(dataset), self.batch_size, seed=self.cfg.run.seed, rank=rank,
                                    world_size=world)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=PairCollator(self.tokenizer),
                                           **common)


# ----------------------------------------------------------------------------------------------- callbacks


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file in the same folder, flushed, then renamed over the target, so a
    kill at any moment leaves the previous checkpoint intact; read back with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

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


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar (steps, ETA, loss, lr, logit scale, samples/s) without the logger version."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class RetrievalValidation(Callback):
    """Text->image and image->text Recall@1/5/10 on held-out pairs after every `every` epochs and at the end,
    through the library's embedding path (`embed_images` / `embed_texts`)."""

    def __init__(self, pairs: Pairs, preprocess: PreprocessConfig, tokenizer: Tokenizer, batch_size: int,
                 workers: int, every: int, log_file: Path, max_images: int | None = None):
        if max_images is not None:
            pairs = Pairs(pairs.images[:max_images], pairs.captions[:max_images], pairs.source)
        self.pairs, self.tokenizer, self.batch_size, self.workers = pairs, tokenizer, batch_size, workers
        self.transform = image_transform(preprocess, is_train=False)
        self.every, self.log_file = max(1, every), Path(log_file)
        self.last: dict[str, float] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last_epoch = (trainer.should_stop or trainer.current_epoch + 1 >= (trainer.max_epochs or 0)
                      or 0 < trainer.max_steps <= trainer.global_step)
        if (trainer.current_epoch + 1) % self.every and not last_epoch:
            return
        if trainer.is_global_zero:
            started = time.perf_counter()
            with pl_module.final_weights():
                metrics = self.evaluate(pl_module.model, trainer.precision_plugin)
            self.last = {"epoch": trainer.current_epoch, "step": trainer.global_step,
                         "seconds": round(time.perf_counter() - started, 2), **metrics}
            with self.log_file.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(self.last) + "\n")
            pl_module.log_dict({f"val/{k}": v for k, v in metrics.items()}, rank_zero_only=True)

    @torch.no_grad()
    def evaluate(self, model: CLIP, precision_plugin: Any = None) -> dict[str, float]:
        from ..embed import embed_images
        from ..eval.retrieval import retrieval_metrics

        was_training = model.training
        model.eval()
        try:
            context = precision_plugin.forward_context() if precision_plugin is not None else _nullcontext()
            with context:
                images = embed_images(model, self.pairs.images, self.transform, batch_size=self.batch_size,
                                      num_workers=self.workers, progress=False)
                captions, owners = [], []
                for row, index in enumerate(images.indices):  # captions of the images that decoded
                    captions += self.pairs.captions[index]
                    owners += [row] * len(self.pairs.captions[index])
                texts = self._embed_captions(model, captions)
        finally:
            model.train(was_training)
        if len(images) == 0:
            raise ValueError(f"{self.pairs.source}: none of the validation images could be decoded")
        out = retrieval_metrics(images.embeddings, texts, owners, ks=(1, 5, 10))
        keep = [k for k in out if "recall@" in k]
        return {k: float(out[k]) for k in keep}

    def _embed_captions(self, model: CLIP, captions: list[str]) -> torch.Tensor:
        """`embed_texts` over the captions sorted by length, each batch cut to its longest caption (the same
        features, about half the work for short captions), returned in the original order."""
        from ..embed import embed_texts

        order = sorted(range(len(captions)), key=lambda i: len(self.tokenizer.encode(captions[i])))
        tokenizer = self.tokenizer

        def tokenize(texts: list[str]) -> torch.Tensor:
            return trim_padding(tokenizer(texts))

        features = embed_texts(model, [captions[i] for i in order], tokenize, batch_size=self.batch_size,
                               progress=False)
        out = torch.empty_like(features)
        out[torch.tensor(order, dtype=torch.long)] = features
        return out


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------------------------- run


def resolve_resume(resume: str | None, output: Path) -> str | None:
    """A checkpoint path for `--resume latest|PATH` (None: start fresh)."""
    if not resume:
        return None
    path = output / "checkpoints" / LATEST if resume == "latest" else Path(resume)
    if not path.is_file():
        raise ValueError(f"cannot resume: no checkpoint at {path}" +
                         ("; run without --resume to start a new run" if resume == "latest" else ""))
    return str(path)


class MetricsCSV(Logger):
    """`logs/metrics.csv`: one row per logged step (step, epoch, loss, lr, logit_scale, samples_per_sec,
    data_wait, val/...). Unlike Lightning's CSVLogger it survives a resume: rows the killed run logged after its
    last checkpoint are dropped and the new rows are appended, so the file holds one continuous curve."""

    def __init__(self, folder: Path, resume_step: int | None = None):
        super().__init__()
        self.path = Path(folder) / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rows: list[dict[str, Any]] = []
        self._keys: list[str] = []
        if resume_step is not None and self.path.is_file():
            with self.path.open(newline="", encoding="utf-8") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["step"]) < resume_step]
            self._keys = list(kept[0]) if kept else []
            self._write(kept, mode="w")
        elif self.path.exists():
            self.path.unlink()  # a fresh run in an old folder starts a fresh log

    @property
    def name(self) -> str:
        return "logs"

    @property
    def version(self) -> str:
        return ""

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {"step": step, **{k: float(v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}}
        self._rows.append(row)
        self.save()  # every logged step reaches the disk: a killed run loses nothing it logged

    @rank_zero_only
    def save(self) -> None:
        if not self._rows:
            return
        new = [k for row in self._rows for k in row if k not in self._keys]
        if new:
            existing = []
            if self.path.is_file():
                with self.path.open(newline="", encoding="utf-8") as handle:
                    existing = list(csv.DictReader(handle))
            self._keys = ["step", *sorted({*self._keys, *new} - {"step"})]
            self._write(existing, mode="w")
        self._write(self._rows, mode="a")
        self._rows = []

    def _write(self, rows: list[dict[str, Any]], mode: str) -> None:
        fresh = mode == "w" or not self.path.is_file()
        with self.path.open("w" if fresh else "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._keys, restval="")
            if fresh:
                writer.writeheader()
            writer.writerows(rows)


def _loggers(cfg: TrainConfig, output: Path, resume_step: int | None) -> list[Any]:
    loggers: list[Any] = [MetricsCSV(output / "logs", resume_step)]
    if cfg.run.tensorboard:
        try:
            import tensorboard  # noqa: F401
            from lightning.pytorch.loggers import TensorBoardLogger
        except ImportError:
            pass
        else:
            loggers.append(TensorBoardLogger(output, name="logs", version="tensorboard", default_hp_metric=False))
    return loggers


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
    _trim_validation_log(output / "val.jsonl", _step_of(ckpt_path))
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
    trainer = L.Trainer(
        accelerator=cfg.run.accelerator, devices=cfg.run.devices, num_nodes=cfg.run.num_nodes,
        strategy=cfg.run.strategy, precision=precision, max_epochs=cfg.optim.epochs,
        max_steps=cfg.optim.max_steps or -1, logger=_loggers(cfg, output, _step_of(ckpt_path)), callbacks=callbacks,
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
        (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _trim_validation_log(path: Path, resume_step: int | None) -> None:
    """As the metrics log: a fresh run starts an empty file; a resumed one keeps the rows up to its checkpoint."""
    if not path.is_file():
        return
    kept = []
    if resume_step is not None:
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step]
    path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")


def _step_of(ckpt_path: str | None) -> int | None:
    if ckpt_path is None:
        return None
    return int(torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def _save_final(model: CLIP, folder: Path, cfg: TrainConfig, summary: dict[str, Any],
                preprocess: PreprocessConfig) -> None:
    from ..checkpoints import save_model

    # With --init the architecture is the initial checkpoint's, whatever model.arch (a default) says.
    provenance = {"trained_by": "clipforge train", "init": cfg.model.init or None,
                  "arch": None if cfg.model.init else cfg.model.arch,
                  "train_data": cfg.data.train, "steps": summary["steps"],
                  "validation": summary["validation"]}
    model.eval()
    save_model(model, folder, provenance=provenance, preprocess_cfg=preprocess)


def _quiet_lightning() -> None:
    """Keep Lightning's console output to the progress bar: no tips, no warnings about choices made on purpose."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*Experiment logs directory.*exists and is not empty.*",
                    ".*dataloader is not resumable.*", ".*Found .* module\\(s\\) in eval mode.*",
                    ".*`training_step` returned.*", ".*GPU available but not used.*",
                    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
                    ".*when logging on epoch level in distributed setting.*",  # validation runs on rank 0 only
                    ".*Your `IterableDataset` has `__len__` defined.*",  # ShardStream splits its length over workers
                    ".*is smaller than the logging interval.*"):  # a small data set: logging follows the global step
        warnings.filterwarnings("ignore", message=pattern)
