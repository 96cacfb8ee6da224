"""Import open_clip 3.3.0 beside the CPU torch for side-by-side benchmarks.

PyPI's torchvision cannot load its compiled ops next to the CPU build of torch. open_clip imports
torchvision but never calls those ops, so declaring the two op schemas that torchvision's Python side
registers fake kernels for is enough to import it. Run benchmarks with the bench venv
(`make bench-setup` creates bench/.venv-openclip with open_clip, torch==2.13.0 and clipforge).
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import torch

_TORCHVISION_LIB = None


def _declare_torchvision_ops() -> None:
    global _TORCHVISION_LIB
    spec = importlib.util.find_spec("torchvision")
    if spec is None or _TORCHVISION_LIB is not None:
        return
    try:
        ctypes.CDLL(str(Path(next(iter(spec.submodule_search_locations))) / "_C.so"))
    except OSError:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_LIB = lib


def import_open_clip():
    """The open_clip module, or a clear error saying how to get the bench environment."""
    _declare_torchvision_ops()
    try:
        import open_clip
    except ImportError as err:
        raise SystemExit("open_clip is not installed here: run `make bench-setup`, then run the benchmark "
                         "with bench/.venv-openclip/bin/python") from err
    return open_clip


SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"
