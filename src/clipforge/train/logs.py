"""What a training run shows and records: the progress bar, `logs/metrics.csv` (one continuous curve across
resumes) and, when installed, TensorBoard."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from ..util import atomic_write_text
from .config import TrainConfig

__all__ = ["MetricsCSV", "ProgressBar", "make_loggers"]


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar (steps, ETA, loss, lr, logit scale, samples/s) without the logger version."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


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
            self._rewrite(kept)
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
            self._rewrite(existing)
        if not self.path.is_file():
            self._rewrite([])
        with self.path.open("a", newline="", encoding="utf-8") as handle:
            csv.DictWriter(handle, fieldnames=self._keys, restval="").writerows(self._rows)
        self._rows = []

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        """The whole file anew (a header for the current columns, then `rows`), atomically: a kill while a new
        column is added or a resume trims the log leaves the old file, not half of one."""
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self._keys, restval="")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, text.getvalue())


def make_loggers(cfg: TrainConfig, output: Path, resume_step: int | None) -> list[Any]:
    """The metrics CSV, and TensorBoard's logger when `run.tensorboard` is on and tensorboard is installed."""
    loggers: list[Any] = [MetricsCSV(output / "logs", resume_step)]
    if cfg.run.tensorboard:
        try:  # an optional dependency: imported only when asked for, and its absence is no error
            import tensorboard  # noqa: F401
            from lightning.pytorch.loggers import TensorBoardLogger
        except ImportError:
            pass
        else:
            loggers.append(TensorBoardLogger(output, name="logs", version="tensorboard", default_hp_metric=False))
    return loggers
