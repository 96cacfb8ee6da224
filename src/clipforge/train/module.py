"""The LightningModule that trains a CLIP: the loss, the learning-rate schedule, accumulation and logging.

Lightning runs the optimisation (backward, gradient clipping, the optimizer step) for ordinary steps; this module
sets each step's learning rate and, after the step, clamps the temperature to ``logit_scale <= ln(100)`` (as in
CLIP) and updates the weight average.

Optimisation is manual only with ``accum_freq > 1``, because one optimizer step then runs several micro-batches
whose loss must see the negatives of all of them (open_clip's ``accum_freq``), which Lightning's accumulation (one
backward per micro-batch against its own negatives) cannot do: features of every micro-batch are first computed
without gradient and cached; then each micro-batch is encoded again with gradient and its loss computed against
the cached features of the others, so the accumulated gradient is that of the loss over the whole batch.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from ..data.loading import BadItemCounter
from ..model import CLIP
from .averaging import WeightAverage
from .checkpointing import adopt_step_progress
from .config import LossConfig, ModelConfig, OptimConfig
from .loss import build_loss
from .parameters import group_names, lock_towers, match_optimizer_state, param_groups

__all__ = ["MAX_LOGIT_SCALE", "CLIPTrainingModule", "lr_at"]

MAX_LOGIT_SCALE = math.log(100)


def lr_at(step: int, total_steps: int, base_lr: float, warmup: int, min_lr_ratio: float = 0.0,
          time_fraction: float = 0.0) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to `min_lr_ratio * base_lr` at the end.

    The end is `total_steps`, or sooner when a wall-time budget is set: `time_fraction` (elapsed / budget)
    moves the cosine along when the clock runs out before the steps do."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(1.0, max(progress, time_fraction))
    floor = base_lr * min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class CLIPTrainingModule(L.LightningModule):
    """Contrastive training of a `clipforge.model.CLIP`.

    Logs per step: ``loss``, ``lr``, ``logit_scale`` (the temperature's inverse, ``exp`` of the parameter),
    ``samples_per_sec`` (global, over the logging window) and ``data_wait`` (fraction of the window spent waiting
    for batches)."""

    def __init__(self, model: CLIP, optim: OptimConfig, loss: LossConfig, model_cfg: ModelConfig | None = None,
                 max_bad_fraction: float = 0.05, log_every_steps: int = 10):
        super().__init__()
        self.model = model
        self.optim_cfg, self.loss_cfg = optim, loss
        self.automatic_optimization = self.accum_freq == 1  # see the module docstring
        self.loss_fn = build_loss(loss.kind, local_loss=loss.local_loss, gather_with_grad=loss.gather_with_grad,
                                  label_smoothing=loss.label_smoothing)
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if loss.kind == "siglip" else None
        if loss.init_logit_scale is not None:
            if not 1.0 <= loss.init_logit_scale <= math.exp(MAX_LOGIT_SCALE):
                raise ValueError(f"loss.init_logit_scale must be within [1, 100], got {loss.init_logit_scale}")
            with torch.no_grad():
                model.logit_scale.fill_(math.log(loss.init_logit_scale))
        model_cfg = model_cfg or ModelConfig()
        self._frozen_modules = lock_towers(model, model_cfg)
        self._image_trainable = any(p.requires_grad for p in model.visual.parameters())
        self._text_trainable = any(p.requires_grad for p in model.text.parameters())
        if model_cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.bad_items = BadItemCounter(max_fraction=max_bad_fraction)
        self.log_every_steps = max(1, log_every_steps)
        self.elapsed_before = 0.0  # training wall time of earlier (resumed) runs, seconds
        self._fit_started = time.perf_counter()
        self._resume_position: tuple[int, int] | None = None
        self._position = (0, 0)  # (epoch, batches of it consumed)
        self._window = {"samples": 0, "wait": 0.0, "busy": 0.0}
        self._last_end: float | None = None
        self._batch_start = 0.0
        self._rng_state: dict[str, Any] | None = None
        self._fused = False
        self._lr = optim.lr
        self.ema = WeightAverage(model, optim.ema_decay) if optim.ema_decay else None

    @property
    def accum_freq(self) -> int:
        return max(1, self.optim_cfg.accum_freq)

    # ------------------------------------------------------------------------------------------ setup

    def configure_optimizers(self):
        cfg = self.optim_cfg
        groups = param_groups(self, cfg.wd)
        self._fused = self._can_fuse(groups)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=self._fused)

    def _can_fuse(self, groups: list[dict[str, Any]]) -> bool:
        """The fused AdamW kernel updates every tensor in one pass, far faster than torch's default step on a CPU
        (bench/bench_kernels.py). Not with fp16's gradient scaler, whose unscaling and clipping Lightning must do."""
        trainer = self._trainer
        if trainer is not None and str(trainer.precision).startswith("16"):
            return False
        return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])

    def on_before_optimizer_step(self, optimizer) -> None:
        """Gradient clipping (`optim.grad_clip`, by norm), in both kinds of optimisation. Lightning calls this
        hook inside the optimizer step, after 16-mixed's gradient scaler has unscaled the gradients (clipping the
        scaled ones would all but stop learning). Lightning's own `gradient_clip_val` would not do: it is refused
        in manual optimisation, and for fused optimizers under mixed precision."""
        clip = self.optim_cfg.grad_clip
        if not clip:
            return
        if self._fused:  # plain (unscaled) gradients: fusing is off with fp16's scaler
            torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.grad is not None], clip)
        else:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def train(self, mode: bool = True):
        super().train(mode)
        for module in getattr(self, "_frozen_modules", ()):
            module.eval()  # a locked tower's BatchNorm keeps its statistics
        return self

    @property
    def total_steps(self) -> int:
        if self.optim_cfg.max_steps:
            return int(self.optim_cfg.max_steps)
        return int(self.trainer.estimated_stepping_batches)

    @property
    def elapsed(self) -> float:
        """Training wall time so far, over all resumed runs (seconds)."""
        return self.elapsed_before + time.perf_counter() - self._fit_started

    def on_train_start(self) -> None:
        self._fit_started = time.perf_counter()
        self._last_end = None
        if self._rng_state is not None:
            _set_rng_state(self._rng_state)
            self._rng_state = None
        loader = self.trainer.train_dataloader
        sampler = getattr(loader, "batch_sampler", None)
        if self._resume_position is not None and hasattr(sampler, "resume_at"):
            sampler.resume_at(*self._resume_position)

    def on_train_epoch_start(self) -> None:
        # Streams (WebDataset shards) reshuffle per epoch; Lightning only tells samplers about epochs.
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)

    # ------------------------------------------------------------------------------------------ step

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self._window["wait"] += now - self._last_end
        self._batch_start = now

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.bad_items.update(batch.get("seen", len(batch["images"])), batch.get("bad", []))
        self.bad_items.check()
        self._position = (self.current_epoch, batch_idx + 1)
        images, texts = batch["images"], batch["texts"]
        if self.automatic_optimization:  # Lightning runs backward and the step (see optimizer_step)
            loss = self.compute_loss(*self.encode(images, texts))
        else:
            opt = self.optimizers()
            self._set_lr(opt)
            loss = self._accumulated_backward(images, texts)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self._after_step()
        self._window["samples"] += len(images) * self.trainer.world_size
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        self.log("lr", self._lr, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """An automatic step: this step's learning rate, Lightning's step (the closure runs `training_step` and
        backward, then clipping), then the temperature clamp and the weight average."""
        self._set_lr(optimizer)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._after_step()

    def _after_step(self) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        if self.ema is not None:
            self.ema.update(self.global_step)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After the optimizer step: the temperature as the step left it.
        self.log("logit_scale", self.model.logit_scale.exp().item(), prog_bar=True, on_step=True, on_epoch=False)
        now = time.perf_counter()
        self._window["busy"] += now - self._batch_start
        self._last_end = now
        window = self._window
        total = window["wait"] + window["busy"]
        if total > 0:
            self.log("samples_per_sec", window["samples"] / total, prog_bar=True, on_step=True, on_epoch=False)
            self.log("data_wait", window["wait"] / total, on_step=True, on_epoch=False)
        if self.global_step % self.log_every_steps == 0:
            self._window = {"samples": 0, "wait": 0.0, "busy": 0.0}
        if self.optim_cfg.max_minutes and self._time_fraction() >= 1.0:
            self.trainer.should_stop = True

    def _time_fraction(self) -> float:
        if not self.optim_cfg.max_minutes:
            return 0.0
        elapsed = self.elapsed
        if self.trainer.world_size > 1:  # every rank must follow rank 0's clock, or their schedules would differ
            elapsed = self.trainer.strategy.broadcast(elapsed, src=0)
        return elapsed / (60 * self.optim_cfg.max_minutes)

    def _set_lr(self, optimizer) -> None:
        """This step's learning rate into every parameter group (`optimizer` plain or Lightning's wrapper)."""
        cfg = self.optim_cfg
        self._lr = lr_at(self.global_step, self.total_steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio,
                         self._time_fraction())
        for group in getattr(optimizer, "optimizer", optimizer).param_groups:
            group["lr"] = self._lr

    def encode(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised features; a fully locked tower runs without building a graph."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._image_trainable):
            image_features = self.model.encode_image(images, normalize=True)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._text_trainable):
            text_features = self.model.encode_text(texts, normalize=True)
        return image_features, text_features

    def compute_loss(self, image_features: torch.Tensor, text_features: torch.Tensor,
                     temperature_grad: bool = True) -> torch.Tensor:
        """The contrastive loss; with k captions per image (``text_features`` has k rows per image, image-major),
        the mean of the k losses of the images against their j-th captions, plus ``loss.caption_contrast`` times
        the mean of the same loss between their j-th and m-th captions over the pairs j < m."""
        scale, bias = self.model.logit_scale, self.logit_bias
        if not temperature_grad:
            scale, bias = scale.detach(), bias.detach() if bias is not None else None
        per_image = len(text_features) // max(1, len(image_features))
        if per_image <= 1 or len(text_features) != per_image * len(image_features):
            return self.loss_fn(image_features, text_features, scale.exp(), bias)
        captions = [c.contiguous() for c in text_features.view(len(image_features), per_image, -1).unbind(1)]
        temperature = scale.exp()
        loss = torch.stack([self.loss_fn(image_features, c, temperature, bias) for c in captions]).mean()
        if self.loss_cfg.caption_contrast:
            # Two captions of one photo are positives for each other, other photos' captions negatives. A single
            # caption is a noisy view of its photo (on Flickr8k, a query that averages an image's 5 captions
            # finds it half as often again as one caption does); pulling the captions together cuts that noise.
            pairs = [self.loss_fn(a, b, temperature, bias) for a, b in itertools.combinations(captions, 2)]
            loss = loss + self.loss_cfg.caption_contrast * torch.stack(pairs).mean()
        return loss

    def _accumulated_backward(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """Backward over `accum_freq` micro-batches whose loss sees the negatives of all (see the module docstring)."""
        accum_freq = self.accum_freq
        if len(images) % accum_freq:
            raise ValueError(f"batch of {len(images)} does not split into accum_freq={accum_freq} micro-batches")
        image_chunks, text_chunks = images.chunk(accum_freq), texts.chunk(accum_freq)
        with torch.no_grad():  # training mode: the same plain ops as the gradient passes below
            cached = [self.encode(i, t) for i, t in zip(image_chunks, text_chunks, strict=True)]
        loss = torch.zeros(())
        for j in range(accum_freq):
            image_features, text_features = self.encode(image_chunks[j], text_chunks[j])
            all_images = torch.cat([image_features if m == j else c[0] for m, c in enumerate(cached)])
            all_texts = torch.cat([text_features if m == j else c[1] for m, c in enumerate(cached)])
            # Each pass computes the loss of the whole batch: the towers get the gradient through micro-batch j
            # only, the temperature (and SigLIP's bias) in the first pass only, so that nothing counts twice.
            loss = self.compute_loss(all_images, all_texts, temperature_grad=j == 0)
            self.manual_backward(loss)
        return loss.detach()

    def final_weights(self) -> contextlib.AbstractContextManager:
        """A context in which the model holds the weights to evaluate and save: the moving average when there is
        one, else the trained weights as they are."""
        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------ state

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["clipforge"] = {
            "elapsed": self.elapsed,
            "position": list(self._position),
            "bad_items": self.bad_items.state_dict(),
            "rng": _get_rng_state(),
        }
        optimizers = self._trainer.optimizers if self._trainer is not None else []
        if optimizers:  # which parameter each position of the optimizer state belongs to
            checkpoint["clipforge"]["optimizer_params"] = group_names(self, optimizers[0].param_groups)
        if self.ema is not None:
            checkpoint["clipforge"]["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("clipforge", {})
        adopt_step_progress(checkpoint, self.automatic_optimization)
        if checkpoint.get("optimizer_states"):
            current = group_names(self, param_groups(self, self.optim_cfg.wd))
            # Checkpoints before the names were recorded list parameters in their state dict's order.
            saved = state.get("optimizer_params") or [[n for n in checkpoint["state_dict"] if n in set(group)]
                                                      for group in current]
            match_optimizer_state(checkpoint["optimizer_states"][0], saved, current)
        self.elapsed_before = float(state.get("elapsed", 0.0))
        if "position" in state:
            self._resume_position = tuple(int(v) for v in state["position"])  # type: ignore[assignment]
        if "bad_items" in state:
            self.bad_items.load_state_dict(state["bad_items"])
        self._rng_state = state.get("rng")
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])


def _get_rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain values (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
