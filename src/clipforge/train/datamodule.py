"""Training data for Lightning: the pairs of a caption table or image folder, or WebDataset shards, as a
LightningDataModule whose loader each rank builds for its own share once the process group exists."""

from __future__ import annotations

import lightning as L
import torch

from ..data.loading import (
    EpochBatchSampler,
    PairCollator,
    PairDataset,
    Pairs,
    ShardStream,
    pairs_from_folder,
    pairs_from_table,
)
from ..data.sources import source_kind
from ..model import PreprocessConfig
from ..tokenizer import Tokenizer
from ..transforms import image_transform
from .config import DataConfig, TrainConfig

__all__ = ["CLIPDataModule", "read_pairs"]


def read_pairs(spec: str, cfg: DataConfig, kind: str | None = None) -> Pairs:
    """Pairs from a caption table or a labelled image folder (`kind`: as `data.kind`, default auto-detect)."""
    kind = source_kind(spec) if kind in (None, "auto") else kind
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
        self.kind = source_kind(cfg.data.train) if cfg.data.kind == "auto" else cfg.data.kind
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
