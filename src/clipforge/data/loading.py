"""Training batches from caption tables, labelled image folders and WebDataset shards.

Every source becomes batches ``{"images": [B,3,S,S], "texts": [B,L], "bad": [(item, reason), ...],
"seen": int, "position": (epoch, batch)}``:

* caption tables and image folders are map-style (`PairDataset`), ordered by `EpochBatchSampler`: one seeded
  permutation per epoch, split over ranks, resumable at any batch (`resume_at`), and each item's augmentation
  and caption choice seeded by (seed, epoch, index), so a resumed run sees exactly the data it would have seen;
* WebDataset tar shards (img2dataset layout: ``KEY.jpg`` + ``KEY.txt``; `shards` says which members are a
  sample's image) stream through the ``webdataset`` library (`ShardStream`), with a shuffle buffer, optional
  shard resampling and a fixed number of samples per epoch.

Which kind a source is, is `sources.source_kind`'s to say.

A bad item (missing, truncated or not an image, zero-size, decompression bomb, empty caption) never stops a
batch: map-style sources replace it with the next good item (batches keep their size, which all-gather
across processes needs), streams skip it. Each batch reports its bad items so that `BadItemCounter` can
count them, keep the first examples and stop the run when more than a set fraction fails.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..images import ImageDecodeError, load_image
from ..util import one_line
from .shards import sample_image
from .sources import group_by_image, read_caption_table, read_labelled_images

__all__ = [
    "BadItemCounter",
    "EpochBatchSampler",
    "PairDataset",
    "ShardStream",
    "collate_pairs",
    "pairs_from_folder",
    "pairs_from_table",
    "trim_padding",
]

_MAX_REPLACEMENTS = 16  # items a map-style batch slot tries before giving up on the slot
Transform = Callable[[Any], torch.Tensor]
Caption = str | tuple[str, ...]  # one caption, or several of one image (captions_per_image > 1)


# ----------------------------------------------------------------------------------------------- sources


@dataclass
class Pairs:
    """Images and their captions: `captions[i]` lists the captions of `images[i]` (at least one each)."""

    images: list[str]
    captions: list[list[str]]
    source: str = ""

    @property
    def num_captions(self) -> int:
        return sum(len(c) for c in self.captions)


def pairs_from_table(path: str | Path, image_col: str = "image_path", caption_col: str = "caption") -> Pairs:
    """Captions grouped by image from a CSV/TSV/Parquet table (one row per caption; paths relative to the table's
    folder or absolute). Missing image files are not an error here: training counts them as bad items."""
    table = read_caption_table(path, image_col, caption_col, check_files=False)
    images, captions = group_by_image([str(image) for image in table.image_paths], table.captions)
    return Pairs(images, captions, str(path))


def pairs_from_folder(path: str | Path, templates: Sequence[str]) -> Pairs:
    """Labelled images (an ImageFolder tree or a labels table); each image's captions are the templates filled
    with its class name (underscores read as spaces)."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"caption templates must each contain '{{}}' for the class name, got {list(templates)}")
    labelled = read_labelled_images(path, check_files=False)
    return Pairs([str(p) for p in labelled.paths],
                 [[t.format(label.replace("_", " ")) for t in templates] for label in labelled.labels], str(path))


# ----------------------------------------------------------------------------------------------- bad items


@dataclass
class BadItemCounter:
    """Counts items seen and items that failed, keeps the first examples, and enforces a maximum fraction.

    The fraction is only enforced after `min_seen` items, so that one bad file in the first batch does not
    stop a run whose data is 99.9 % good."""

    max_fraction: float = 0.05
    min_seen: int = 200
    max_examples: int = 5
    seen: int = 0
    bad: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)

    def update(self, seen: int, bad: Sequence[tuple[str, str]]) -> None:
        self.seen += seen
        self.bad += len(bad)
        room = self.max_examples - len(self.examples)
        if room > 0:
            self.examples.extend((str(item), str(reason)) for item, reason in bad[:room])

    @property
    def fraction(self) -> float:
        return self.bad / self.seen if self.seen else 0.0

    def check(self, final: bool = False) -> None:
        """ValueError when too large a fraction of the items seen so far was bad."""
        if (final or self.seen >= self.min_seen) and self.fraction > self.max_fraction:
            first = "; ".join(f"{item}: {reason}" for item, reason in self.examples[:3])
            raise ValueError(f"{self.bad} of {self.seen} training items ({self.fraction:.1%}) could not be used, "
                             f"more than max_bad_fraction={self.max_fraction:g}; first: {first}. Fix or remove "
                             "them, or raise data.max_bad_fraction")

    def summary(self) -> dict[str, Any]:
        return {"seen": self.seen, "bad": self.bad, "fraction": self.fraction,
                "examples": [{"item": item, "reason": reason} for item, reason in self.examples]}

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "bad": self.bad, "examples": [list(e) for e in self.examples]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen, self.bad = int(state["seen"]), int(state["bad"])
        self.examples = [(str(a), str(b)) for a, b in state["examples"]]


# ----------------------------------------------------------------------------------------------- map-style


class PairDataset(Dataset):
    """Image-caption pairs for training. Keys are ``(epoch, index)`` (from `EpochBatchSampler`) or plain ints.

    `sample_captions=False`: one item per caption (an image with 5 captions is seen 5 times per epoch).
    `sample_captions=True`: one item per image, with a caption drawn at random each time it is seen; with
    `captions_per_image=k > 1`, k of its captions (distinct while it has k), as a tuple.
    Returns ``(pixels, caption, bad)`` where `bad` lists ``(item, reason)`` for the items skipped to get there.
    """

    def __init__(self, pairs: Pairs, transform: Transform, seed: int = 0, sample_captions: bool = False,
                 captions_per_image: int = 1, word_dropout: float = 0.0):
        if captions_per_image < 1 or (captions_per_image > 1 and not sample_captions):
            raise ValueError(f"captions_per_image must be 1, or more with sample_captions; got {captions_per_image}")
        if not 0.0 <= word_dropout < 1.0:
            raise ValueError(f"word_dropout must be in [0, 1), got {word_dropout}")
        self.word_dropout = word_dropout
        self.pairs, self.transform, self.seed = pairs, transform, seed
        self.sample_captions = sample_captions
        self.captions_per_image = captions_per_image
        self.draft_size = getattr(transform, "draft_size", None)
        if sample_captions:
            self.items = [(i, -1) for i in range(len(pairs.images))]
        else:
            self.items = [(i, j) for i, caps in enumerate(pairs.captions) for j in range(len(caps))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor | None, Caption, list[tuple[str, str]]]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        bad: list[tuple[str, str]] = []
        # Replacements are drawn at random (seeded): bad files often come in runs, and the next item in the
        # table would then be bad too.
        replacements = random.Random(self._seed(epoch, index))
        position = index
        for _ in range(_MAX_REPLACEMENTS):
            try:
                pixels, caption = self._load(epoch, position)
                return pixels, caption, bad
            except (ImageDecodeError, OSError, ValueError) as err:
                bad.append((self._describe(position), one_line(err, whole=True)))
                position = replacements.randrange(len(self.items))
        return None, "", bad

    def _seed(self, epoch: int, position: int) -> int:
        return ((self.seed * 1_000_003 + epoch) * 1_000_033 + position) % (1 << 62)

    def _load(self, epoch: int, position: int) -> tuple[torch.Tensor, Caption]:
        image_index, caption_index = self.items[position]
        # One seed per (seed, epoch, item): the same crop and caption whatever the worker or resume point.
        item_seed = self._seed(epoch, position)
        captions = self.pairs.captions[image_index]
        caption: Caption
        if caption_index >= 0:
            caption = captions[caption_index]
        elif self.captions_per_image == 1:
            caption = random.Random(item_seed).choice(captions)
        else:  # k captions, distinct while the image has k; repeated in a shuffled order when it has fewer
            order = random.Random(item_seed).sample(range(len(captions)), len(captions))
            caption = tuple(captions[order[i % len(order)]] for i in range(self.captions_per_image))
        if any(not text or not text.strip() for text in _caption_texts(caption)):
            raise ValueError("empty caption")
        if self.word_dropout:
            caption = _drop_words(caption, self.word_dropout, random.Random(item_seed + 1))
        image = load_image(self.pairs.images[image_index], draft_size=self.draft_size)
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed also queues CUDA seeding, which costs ~10 ms per call.
            torch.default_generator.manual_seed(item_seed)
            return self.transform(image), caption

    def _describe(self, position: int) -> str:
        image_index, caption_index = self.items[position]
        where = self.pairs.images[image_index]
        if caption_index < 0 or len(self.pairs.captions[image_index]) == 1:
            return where
        return f"{where} (caption {caption_index + 1})"


class EpochBatchSampler:
    """Batches of ``(epoch, index)`` keys: a seeded permutation per epoch, this rank's share, full batches.

    Every rank gets the same number of batches (a tail shorter than `world * batch_size` is dropped and reshuffled
    into the next epoch). `set_epoch` is called by Lightning at each epoch start; `resume_at(epoch, n)` makes
    the pass over `epoch` start at its batch n (a resumed run)."""

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if num_items < batch_size * world_size:
            raise ValueError(f"{num_items} training items are fewer than one global batch "
                             f"({batch_size} x {world_size} devices); lower the batch size")
        self.num_items, self.batch_size, self.seed, self.shuffle = num_items, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._resume: tuple[int, int] | None = None
        self.sampler = self  # Lightning looks for `batch_sampler.sampler.set_epoch`

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches: int) -> None:
        self._resume = (epoch, batches)

    def __len__(self) -> int:
        return self.num_items // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, skip = self.epoch, 0
        if self._resume is not None and self._resume[0] == epoch:
            skip = self._resume[1]
        self._resume = None
        if self.shuffle:
            order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.num_items)
        global_batch = self.batch_size * self.world_size
        for b in range(skip, len(self)):
            rows = order[b * global_batch:(b + 1) * global_batch][self.rank::self.world_size].tolist()
            yield [(epoch, r) for r in rows]


class PairCollator:
    """Picklable collate: stack pixels, tokenize captions, pass the bad-item reports along."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]):
        self.tokenizer = tokenizer

    def __call__(self, batch: list[tuple[torch.Tensor | None, Caption, list[tuple[str, str]]]]) -> dict[str, Any]:
        return collate_pairs(batch, self.tokenizer)


def _drop_words(caption: Caption, rate: float, rng: random.Random) -> Caption:
    """Each word left out with probability `rate` (a text-side augmentation: the model cannot lean on any one
    word of a caption it has seen before); a caption keeps at least one word."""
    def drop(text: str) -> str:
        words = text.split()
        kept = [w for w in words if rng.random() >= rate]
        return " ".join(kept or [rng.choice(words)])
    return drop(caption) if isinstance(caption, str) else tuple(drop(text) for text in caption)


def _caption_texts(caption: Caption) -> tuple[str, ...]:
    return (caption,) if isinstance(caption, str) else caption


def trim_padding(ids: torch.Tensor) -> torch.Tensor:
    """Token ids without the padding columns that no row uses. The text tower is causal and pools at the
    end-of-text token, so the features are the same, for less work (Flickr8k captions: 14 of 32 tokens)."""
    used = int((ids != 0).sum(dim=1).max()) if len(ids) else ids.shape[1]
    return ids[:, :max(used, 1)]


def collate_pairs(batch: Sequence[tuple[torch.Tensor | None, Caption, list[tuple[str, str]]]],
                  tokenizer: Callable[[list[str]], torch.Tensor]) -> dict[str, Any]:
    """``images [B, 3, S, S]`` and ``texts [B * k, L]``: with k captions per image, image i's are rows
    ``i * k ... i * k + k - 1``."""
    good = [(pixels, caption) for pixels, caption, _ in batch if pixels is not None]
    bad = [report for _, _, reports in batch for report in reports]
    if not good:
        first = "; ".join(f"{item}: {reason}" for item, reason in bad[:3])
        raise ValueError(f"a whole batch of training items failed to load; first: {first}")
    texts = [text for _, caption in good for text in _caption_texts(caption)]
    return {"images": torch.stack([p for p, _ in good]), "texts": trim_padding(tokenizer(texts)),
            "bad": bad, "seen": len(good) + len(bad)}


# ----------------------------------------------------------------------------------------------- WebDataset


class ShardStream(IterableDataset):
    """Batches from WebDataset tar shards (an image, ``KEY.jpg`` or another of `shards.IMAGE_EXTENSIONS`, and
    ``KEY.txt``), read with the `webdataset` library.

    Each epoch yields `num_batches` batches in total over all DataLoader workers of this rank. Shards are
    split over ranks and workers and shuffled per epoch (`resampled=False`, shards restart when exhausted), or
    drawn with replacement (`resampled=True`); samples go through a shuffle buffer of `shuffle_buffer`."""

    def __init__(self, urls: str | list[str], transform: Transform, tokenizer: Callable[[list[str]], torch.Tensor],
                 batch_size: int, num_samples: int, seed: int = 0, shuffle_buffer: int = 1000,
                 resampled: bool = False, world_size: int = 1):
        self.urls, self.transform, self.tokenizer = urls, transform, tokenizer
        self.batch_size, self.seed, self.shuffle_buffer, self.resampled = batch_size, seed, shuffle_buffer, resampled
        self.num_batches = max(1, num_samples // (batch_size * world_size))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def _share(self) -> int:
        """Batches this DataLoader worker yields (the workers together yield exactly `num_batches`)."""
        info = get_worker_info()
        if info is None:
            return self.num_batches
        return self.num_batches // info.num_workers + (info.id < self.num_batches % info.num_workers)

    def _samples(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds  # here, not at the top: only shard training needs the library's start-up time

        info = get_worker_info()
        seed = self.seed * 1_000_003 + self.epoch * 1_009 + (info.id if info else 0)
        dataset = wds.WebDataset(self.urls, resampled=self.resampled, shardshuffle=False if self.resampled else 100,
                                 nodesplitter=None if self.resampled else wds.split_by_node,
                                 handler=wds.warn_and_continue, empty_check=False, seed=seed)
        if not self.resampled:
            dataset = dataset.repeat()
        if self.shuffle_buffer > 1:
            dataset = dataset.shuffle(self.shuffle_buffer, rng=random.Random(seed))
        return iter(dataset)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        share = self._share()
        if share == 0:
            return
        pixels: list[torch.Tensor] = []
        captions: list[str] = []
        bad: list[tuple[str, str]] = []
        produced = 0
        for sample in self._samples():
            try:
                image, caption = self._decode(sample)
                pixels.append(image)
                captions.append(caption)
            except (ImageDecodeError, OSError, ValueError) as err:
                bad.append((f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}", one_line(err, whole=True)))
            if len(pixels) == self.batch_size:
                yield {"images": torch.stack(pixels), "texts": trim_padding(self.tokenizer(captions)), "bad": bad,
                       "seen": len(pixels) + len(bad)}
                pixels, captions, bad = [], [], []
                produced += 1
                if produced == share:
                    return

    def _decode(self, sample: dict[str, Any]) -> tuple[torch.Tensor, str]:
        data = sample_image(sample)
        if data is None:
            raise ValueError(f"no image in the sample (keys: {sorted(k for k in sample if not k.startswith('_'))})")
        text = sample.get("txt")
        if text is None:
            raise ValueError("no caption (.txt) in the sample")
        caption = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
        if not caption.strip():
            raise ValueError("empty caption")
        return self.transform(load_image(data, draft_size=getattr(self.transform, "draft_size", None))), caption
