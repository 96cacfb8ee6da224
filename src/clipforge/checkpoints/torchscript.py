"""Read the tensors of a TorchScript archive (OpenAI's release format) without running its code.

The archive is a zip whose `data.pkl` rebuilds `__torch__.*` module objects. We unpickle it with a
restricted unpickler: module classes become inert attribute bags, tensors are rebuilt from the raw
`data/N` records, and any other global is refused. Nothing from the archive's `code/` is compiled or run.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

_STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class RefusedGlobalError(pickle.UnpicklingError):
    """The archive's pickle names something other than tensors and module stubs; nothing was run."""


class _ScriptModule:
    """Stands in for a `__torch__.*` class: keeps the pickled attributes, nothing else."""

    def __init__(self, *args: Any) -> None:
        self.attributes: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.attributes = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *_unused) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: Path):
        super().__init__(file)
        self._archive, self._prefix, self._source = archive, prefix, source

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return _ScriptModule
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise RefusedGlobalError(f"{self._source}: refusing to load {module}.{name} from a TorchScript archive "
                             "(only tensors are read; no code from a checkpoint is run)")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or storage_type not in _STORAGE_DTYPES:
            raise pickle.UnpicklingError(f"{self._source}: unexpected storage record {pid!r}")
        raw = bytearray(self._archive.read(f"{self._prefix}data/{key}"))
        dtype = _STORAGE_DTYPES[storage_type]
        return torch.frombuffer(raw, dtype=dtype)[:numel] if raw else torch.empty(0, dtype=dtype)


def is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def read_torchscript_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Flattened `{name: tensor}` of every tensor attribute in a TorchScript archive."""
    with zipfile.ZipFile(path) as archive:
        data_pkl = next((n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1), None)
        if data_pkl is None:
            raise ValueError(f"{path}: not a TorchScript archive (no data.pkl)")
        prefix = data_pkl[: -len("data.pkl")]
        with archive.open(data_pkl) as file:
            root = _RestrictedUnpickler(file, archive, prefix, path).load()
    tensors: dict[str, torch.Tensor] = {}
    _flatten(root, "", tensors)
    return {name: tensor.clone() for name, tensor in tensors.items()}


def _flatten(node: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(node, torch.Tensor):
        out[prefix.rstrip(".")] = node
    elif isinstance(node, _ScriptModule):
        for name, value in node.attributes.items():
            _flatten(value, f"{prefix}{name}.", out)
