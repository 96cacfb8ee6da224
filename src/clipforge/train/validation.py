"""Retrieval validation during training: Recall@K of held-out pairs after every few epochs and at the end,
appended to ``val.jsonl`` and logged as ``val/...``."""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ..data.loading import Pairs
from ..eval.retrieval import evaluate_captioned_images
from ..model import CLIP, PreprocessConfig, canonical_precision
from ..tokenizer import Tokenizer
from ..transforms import image_transform
from ..util import atomic_write_text

__all__ = ["RetrievalValidation", "trim_validation_log"]


class RetrievalValidation(Callback):
    """Text->image and image->text Recall@1/5/10 on held-out pairs after every `every` epochs and at the end.

    Validation is evaluation: `clipforge.eval.retrieval.evaluate_captioned_images`, the core of `clipforge evaluate
    retrieval`, on the weights being trained in eval mode and in the run's precision (bf16 weights for a
    bf16-mixed run, as `--precision bf16` would load them), so its Recall@K is what evaluating the saved model at
    that precision gives."""

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
                metrics = self.evaluate(pl_module.model, canonical_precision(trainer.precision))
            self.last = {"epoch": trainer.current_epoch, "step": trainer.global_step,
                         "seconds": round(time.perf_counter() - started, 2), **metrics}
            with self.log_file.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(self.last) + "\n")
            pl_module.log_dict({f"val/{k}": v for k, v in metrics.items()}, rank_zero_only=True)

    @torch.no_grad()
    def evaluate(self, model: CLIP, precision: str = "fp32") -> dict[str, float]:
        """Recall@1/5/10 of `model` at `precision` (fp32, bf16 or fp16); the model itself is left as it was."""
        with _inference_model(model, precision) as inference:
            result = evaluate_captioned_images(inference, self.transform, self.tokenizer, self.pairs.images,
                                               self.pairs.captions, ks=(1, 5, 10), batch_size=self.batch_size,
                                               num_workers=self.workers, progress=False, source=self.pairs.source)
        return {k: float(v) for k, v in result.metrics.items() if "recall@" in k}


@contextlib.contextmanager
def _inference_model(model: CLIP, precision: str) -> Iterator[CLIP]:
    """`model` in eval mode (its mode restored afterwards), or an eval-mode copy in `precision` when its weights are
    in another one: casting the trained weights themselves would round them."""
    if model.precision != precision:
        yield copy.deepcopy(model).set_precision(precision).eval()
        return
    was_training = model.training
    try:
        yield model.eval()
    finally:
        model.train(was_training)


def trim_validation_log(path: Path, resume_step: int | None) -> None:
    """As the metrics log: a fresh run starts an empty file; a resumed one keeps the rows up to its checkpoint."""
    if not path.is_file():
        return
    kept = []
    if resume_step is not None:
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step]
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))
