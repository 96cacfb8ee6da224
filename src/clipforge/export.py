"""Export a CLIP model to ONNX: an image-encoder graph, a text-encoder graph and a `config.json` beside them.

The folder runs without clipforge's model code (onnxruntime or any ONNX runtime):

    image_encoder.onnx   pixel_values float32 [batch, 3, S, S]  -> image_embeds, image_features  float32 [batch, E]
    text_encoder.onnx    input_ids int64 (or int32) [batch, L]  -> text_embeds, text_features    float32 [batch, E]
    config.json          preprocessing, tokenizer, model info, graph signatures, logit scale
    bpe_simple_vocab_16e6.txt.gz   the tokenizer's BPE merges (OpenAI's vocabulary)

Each graph gives two outputs: `*_embeds` is L2-normalised (what clipforge's embedding functions return,
ready for cosine similarity), `*_features` the unnormalised projection (`encode_*(normalize=False)`).
The batch dimension is dynamic; S is the model's image size and L the tokenizer's context length.

Text pooling picks the first end-of-text token of each row (a row without one falls back to its largest
id, which is what the torch model does). For every id the tokenizer can produce this equals the model's
`argmax(ids)` pooling, since end-of-text is the largest id in the vocabulary; it stays right for a
vocabulary where it is not. Both ArgMax ops run on float32 inputs, the type every runtime implements
(integer ArgMax is missing from some runtimes and execution providers), so int32 ids work as well as int64.
"""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import logging
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .model import CLIP
from .tokenizer import VOCAB_FILE, Tokenizer, vocab_bytes
from .transforms import PreprocessConfig
from .util import atomic_write_bytes, atomic_write_json, commit_file

DEFAULT_OPSET = 18  # onnxruntime >= 1.14 runs it; torch's dynamo exporter builds opset 18 natively
EXPORTERS = ("dynamo", "torchscript")
IDS_DTYPES = {"int64": torch.int64, "int32": torch.int32}
IMAGE_FILE, TEXT_FILE, CONFIG_FILE = "image_encoder.onnx", "text_encoder.onnx", "config.json"
FORMAT = "clipforge-onnx"
FORMAT_VERSION = 1
# Past this many bytes of weights a graph keeps them in a `.data` file beside it (protobuf's 2 GiB limit).
_EXTERNAL_DATA_BYTES = 1_500_000_000
# Scaled dot-product attention needs opset 14; the dynamo exporter builds 18 and cannot convert down.
_LOWEST_OPSET = {"dynamo": 18, "torchscript": 14}
_EXAMPLE_BATCH = 2  # torch.export specialises a dimension of size 1, so trace with 2


def first_eot_positions(ids: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Index of the first `eot_id` in each row of `[N, L]` ids; rows without one give their largest id's index.

    Built from Equal, Cast, ArgMax (on float32), ReduceMax and Where, which every ONNX runtime implements
    for any integer id type. Ids stay exact in float32 up to 2**24, far above any CLIP vocabulary."""
    is_eot = (ids == eot_id).float()
    first_eot = is_eot.argmax(dim=-1)  # argmax returns the first of equal maxima (torch and ONNX alike)
    largest = ids.float().argmax(dim=-1)
    return torch.where(is_eot.amax(dim=-1) > 0, first_eot, largest)


class _ImageEncoder(nn.Module):
    """pixel_values -> (L2-normalised image_embeds, unnormalised image_features)."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.encode_image(pixel_values)
        return F.normalize(features, dim=-1), features


class _TextEncoder(nn.Module):
    """input_ids -> (L2-normalised text_embeds, unnormalised text_features), pooled at the first end-of-text."""

    def __init__(self, model: CLIP, eot_id: int):
        super().__init__()
        self.model = model
        self.eot_id = eot_id

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The tower's own argmax pooling is discarded (and pruned from the graph): only its tokens are used.
        _, tokens = self.model.text(input_ids, return_tokens=True)
        pooled = tokens[torch.arange(tokens.shape[0]), first_eot_positions(input_ids, self.eot_id)]
        projection = self.model.text.text_projection
        features = (pooled.to(projection.dtype) @ projection).float()
        return F.normalize(features, dim=-1), features


def export_onnx(
    model: CLIP,
    out_dir: str | Path,
    preprocess_cfg: PreprocessConfig | dict[str, Any] | None = None,
    tokenizer_cfg: dict[str, Any] | None = None,
    opset: int = DEFAULT_OPSET,
    ids_dtype: str = "int64",
    exporter: str = "dynamo",
) -> dict[str, Path]:
    """Write `model` as ONNX image and text encoders with a `config.json` into `out_dir`.

    `preprocess_cfg` and `tokenizer_cfg` default to the model's own (as `clipforge.load` sets them).
    `ids_dtype` is the text graph's input type, `int64` (what tokenizers return) or `int32`. `exporter` is
    `dynamo` (torch's default, needs onnxscript) or `torchscript` (torch's older exporter, deprecated). The
    graphs hold fp32 weights whatever the model's precision. Returns the written paths by role: `image`,
    `text`, `config`, `vocab` (and `image_data`/`text_data` for models too large for one file)."""
    require_onnx(exporter)
    if ids_dtype not in IDS_DTYPES:
        raise ValueError(f"ids_dtype must be one of {', '.join(IDS_DTYPES)}, got {ids_dtype!r}")
    lowest = _LOWEST_OPSET[exporter]
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < lowest:
        raise ValueError(f"opset must be an int >= {lowest} with the {exporter} exporter, got {opset!r}"
                         + (" (exporter='torchscript' goes down to 14)" if exporter == "dynamo" else ""))
    preprocess = _preprocess_config(model, preprocess_cfg)
    tokenizer = Tokenizer.from_config(model.tokenizer_config() if tokenizer_cfg is None else tokenizer_cfg)
    if tokenizer.context_length > model.context_length:
        raise ValueError(f"tokenizer context_length {tokenizer.context_length} is longer than the model's "
                         f"{model.context_length}")
    # The big-model threshold is per graph; both towers together is a safe over-estimate.
    external = sum(p.numel() * 4 for p in model.parameters()) > _EXTERNAL_DATA_BYTES
    if external and exporter != "dynamo":
        raise ValueError("models with over 1.5 GB of fp32 weights need exporter='dynamo' (it writes the "
                         "weights to a .data file beside each graph)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _fp32_cpu_eval(model) as fp32:
        # A private generator: exporting must not move the caller's random state.
        pixels = torch.randn(_EXAMPLE_BATCH, 3, fp32.image_size, fp32.image_size,
                             generator=torch.Generator().manual_seed(0))
        ids = _example_ids(tokenizer, IDS_DTYPES[ids_dtype])
        paths = {
            **_export_graph(_ImageEncoder(fp32).eval(), pixels, "pixel_values", out_dir / IMAGE_FILE, "image",
                            opset, exporter, external),
            **_export_graph(_TextEncoder(fp32, tokenizer.eot_token_id).eval(), ids, "input_ids", out_dir / TEXT_FILE,
                            "text", opset, exporter, external),
        }
        config = _folder_config(fp32, preprocess, tokenizer, ids_dtype, opset, exporter)
    for role in ("image", "text"):
        _check_opset(paths[role], opset)
    paths["vocab"] = atomic_write_bytes(out_dir / VOCAB_FILE, vocab_bytes())
    # config.json last: a folder that has one is complete.
    paths["config"] = atomic_write_json(out_dir / CONFIG_FILE, config)
    return paths


def require_onnx(exporter: str) -> None:
    """A clear ImportError naming the extra to install when an exporter's dependencies are missing."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    needed = ["onnx"] + (["onnxscript"] if exporter == "dynamo" else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: pip install clipforge[onnx]")


def _check_opset(path: Path, opset: int) -> None:
    """Exporters may fall back to another opset when a conversion fails: refuse a graph that is not `opset`."""
    import onnx  # an optional dependency (the onnx extra), checked by require_onnx

    graph = onnx.load(str(path), load_external_data=False)
    written = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise ValueError(f"{path}: asked for ONNX opset {opset} but the exporter wrote opset {written}")


def _preprocess_config(model: CLIP, cfg: PreprocessConfig | dict[str, Any] | None) -> PreprocessConfig:
    if cfg is None:
        cfg = model.preprocess_config
    elif isinstance(cfg, dict):
        cfg = PreprocessConfig.from_dict(cfg)
    if cfg.image_size != model.image_size:
        raise ValueError(f"preprocess image_size {cfg.image_size} does not match the model's {model.image_size}")
    return cfg


@contextmanager
def _fp32_cpu_eval(model: CLIP):
    """The model as fp32 on CPU in eval mode: itself when it already is (its mode restored afterwards),
    else a converted copy, so the caller's model is never changed."""
    if model.precision == "fp32" and model.logit_scale.device.type == "cpu":
        was_training = model.training
        try:
            yield model.eval()
        finally:
            model.train(was_training)
    else:
        yield copy.deepcopy(model).set_precision("fp32").cpu().eval()


def _example_ids(tokenizer: Tokenizer, dtype: torch.dtype) -> torch.Tensor:
    ids = tokenizer(["a photo of a cat", "two dogs playing in the snow"])
    return ids.to(dtype)


def _export_graph(module: nn.Module, example: torch.Tensor, input_name: str, path: Path, role: str,
                  opset: int, exporter: str, external_data: bool) -> dict[str, Path]:
    """Export one encoder with a dynamic batch dimension; files land in `path`'s folder only when complete."""
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        staged = staging / path.name
        outputs = [f"{role}_embeds", f"{role}_features"]
        with _quiet_exporters(), torch.no_grad():
            if exporter == "dynamo":
                batch = torch.export.Dim("batch")
                program = torch.onnx.export(module, (example,), input_names=[input_name], output_names=outputs,
                                            opset_version=opset, dynamic_shapes={input_name: {0: batch}},
                                            dynamo=True, verbose=False)
                program.save(staged, external_data=external_data)
            else:
                axes = {name: {0: "batch"} for name in (input_name, *outputs)}
                torch.onnx.export(module, (example,), staged, input_names=[input_name], output_names=outputs,
                                  opset_version=opset, dynamic_axes=axes, dynamo=False)
        written = {}
        for file in sorted(staging.iterdir()):
            commit_file(file, path.parent / file.name)
            key = role if file.name == path.name else f"{role}_data"
            written[key] = path.parent / file.name
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _quiet_exporters():
    """Silence what the exporters say about this (supported) model: tracer notes on shape checks, the
    legacy exporter's deprecation and indexing notices, the dynamo exporter's skipped torchvision ops."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category in (torch.jit.TracerWarning, DeprecationWarning, FutureWarning):
                warnings.simplefilter("ignore", category=category)
            warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
            yield
    finally:
        logger.setLevel(level)


def _folder_config(model: CLIP, preprocess: PreprocessConfig, tokenizer: Tokenizer, ids_dtype: str,
                   opset: int, exporter: str) -> dict[str, Any]:
    """Everything a user needs to run the graphs without clipforge."""
    size, length, dim = model.image_size, tokenizer.context_length, model.config.embed_dim

    def outputs(role: str) -> dict[str, Any]:
        return {f"{role}_embeds": {"dtype": "float32", "shape": ["batch", dim], "normalized": True},
                f"{role}_features": {"dtype": "float32", "shape": ["batch", dim], "normalized": False}}

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "graphs": {
            "image": {"file": IMAGE_FILE, "outputs": outputs("image"),
                      "inputs": {"pixel_values": {"dtype": "float32", "shape": ["batch", 3, size, size]}}},
            "text": {"file": TEXT_FILE, "outputs": outputs("text"),
                     "inputs": {"input_ids": {"dtype": ids_dtype, "shape": ["batch", length]}}},
        },
        "preprocess": {
            **preprocess.to_dict(),
            "steps": "RGB; resize (shortest side to image_size, long side truncated, then centre crop; or squash "
                     "both sides) with `interpolation`; pixels / 255; (x - mean) / std; channels first",
        },
        "tokenizer": {
            **tokenizer.to_config(),
            "vocab_file": VOCAB_FILE,
            "sot_token_id": tokenizer.sot_token_id,
            "eot_token_id": tokenizer.eot_token_id,
            "pad_token_id": 0,
            "vocab_size": tokenizer.vocab_size,
            "layout": "[sot] ids [eot] then zeros to context_length; longer texts are cut with eot kept last; "
                      "OpenAI's CLIP BPE (ftfy, html unescape, whitespace collapse, lower case)",
        },
        "model": {
            "config": model.config.to_dict(),
            "embed_dim": dim,
            "logit_scale": float(model.logit_scale.detach().exp()),
            "parameters": sum(p.numel() for p in model.parameters()),
            "provenance": model.provenance,
        },
        "export": {"opset": opset, "exporter": exporter, "torch": torch.__version__, "clipforge": __version__,
                   "logits": "logit_scale * image_embedding @ text_embedding.T"},
    }


__all__ = ["DEFAULT_OPSET", "export_onnx", "first_eot_positions", "require_onnx"]
