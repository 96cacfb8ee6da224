"""Datasets: caption tables, labelled image folders, image discovery and generated scenes."""

from __future__ import annotations

from .sources import CaptionTable, LabelledImages, find_images, read_caption_table, read_labelled_images
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
    "write_caption_dataset",
    "write_labelled_dataset",
]
