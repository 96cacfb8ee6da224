"""Datasets: caption tables, labelled image folders and source kinds (`sources`), finding images by content
(`discovery`), the layout of WebDataset shards (`shards`), training batches (`loading`, not imported here: it
needs torch) and generated scenes (`synthetic`)."""

from __future__ import annotations

from .discovery import find_images
from .sources import CaptionTable, LabelledImages, read_caption_table, read_labelled_images, source_kind
from .synthetic import CLASSES, Scene, make_scene, make_scenes, write_caption_dataset, write_labelled_dataset

__all__ = [
    "CLASSES",
    "CaptionTable",
    "LabelledImages",
    "Scene",
    "find_images",
    "make_scene",
    "make_scenes",
    "read_caption_table",
    "read_labelled_images",
    "source_kind",
    "write_caption_dataset",
    "write_labelled_dataset",
]
