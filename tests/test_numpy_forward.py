"""The pure-NumPy CLIP forward pass against the torch model and open_clip's reference features."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clipforge.model import CLIPConfig, create_model, get_model_config
from clipforge.reference import encode_image_numpy, encode_text_numpy, numpy_forward

SHARED = Path(__file__).resolve().parents[2] / "shared"
TINY_VIT = SHARED / "reference" / "models" / "tiny-vit"
TOL = 1e-4  # fp32 torch vs float64 NumPy; measured ~1e-6 on these models


def _tiny_config(seed: int, quick_gelu: bool) -> CLIPConfig:
    """Small ViT CLIP; the shape varies with the seed (heads, MLP ratio) to exercise the reshapes."""
    return CLIPConfig.from_dict({
        "embed_dim": 24,
        "quick_gelu": quick_gelu,
        "vision": {"image_size": 24, "layers": 2, "width": 64, "head_width": [32, 16, 64][seed % 3],
                   "patch_size": [8, 6, 4][seed % 3], "mlp_ratio": [4.0, 2.0, 3.0][seed % 3]},
        "text": {"context_length": 77, "vocab_size": 500, "width": 48, "heads": [2, 3, 1][seed % 3],
                 "layers": 2, "mlp_ratio": [4.0, 2.5, 4.0][seed % 3]},
    })


def _random_model(cfg: CLIPConfig, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm gains and biases (they are 1 and 0 at init)
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.2 * torch.randn_like(param))
    return model


def _state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _random_ids(rng: np.random.Generator, rows: int, length: int, vocab: int) -> np.ndarray:
    """Rows of random ids, each with the end-of-text token (highest id) at a random position."""
    ids = rng.integers(1, vocab - 2, size=(rows, length))
    for row, eot in enumerate(rng.integers(1, length, size=rows)):
        ids[row, eot] = vocab - 1
        ids[row, eot + 1:] = 0
    return ids


@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quickgelu", "gelu"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torch_model(seed: int, quick_gelu: bool):
    cfg = _tiny_config(seed, quick_gelu)
    model = _random_model(cfg, seed)
    weights = _state_dict_numpy(model)
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((3, 3, 24, 24)).astype(np.float32)
    ids = _random_ids(rng, 4, 77, cfg.text.vocab_size)

    with torch.no_grad():
        image_torch = model.encode_image(torch.from_numpy(pixels)).numpy()
        text_torch = model.encode_text(torch.from_numpy(ids)).numpy()
    image_np = encode_image_numpy(weights, cfg.to_dict(), pixels)
    text_np = encode_text_numpy(weights, cfg.to_dict(), ids)

    assert image_np.shape == (3, 24) and text_np.shape == (4, 24)
    assert image_np.dtype == np.float64 and text_np.dtype == np.float64
    assert np.abs(image_np - image_torch).max() <= TOL
    assert np.abs(text_np - text_torch).max() <= TOL
    # The features are far from zero, so agreement is meaningful.
    assert np.abs(image_np).max() > 0.1 and np.abs(text_np).max() > 0.1


def test_short_ids_match_torch_and_padding():
    """Ids shorter than the context use the first L positions; with the causal mask, padding them to
    the full context cannot change the feature at the EOT token."""
    cfg = _tiny_config(0, quick_gelu=True)
    model = _random_model(cfg, 7)
    weights = _state_dict_numpy(model)
    ids = _random_ids(np.random.default_rng(7), 5, 32, cfg.text.vocab_size)

    with torch.no_grad():
        torch_feats = model.encode_text(torch.from_numpy(ids)).numpy()
    short = encode_text_numpy(weights, cfg.to_dict(), ids)
    padded = encode_text_numpy(weights, cfg.to_dict(), np.pad(ids, ((0, 0), (0, 77 - 32))))
    assert np.abs(short - torch_feats).max() <= TOL
    np.testing.assert_allclose(short, padded, rtol=0, atol=1e-12)


def test_exact_gelu_matches_torch_in_float64():
    x = np.linspace(-12.0, 12.0, 4001)
    expected = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(numpy_forward._gelu(x), expected, rtol=0, atol=1e-15)


def test_reference_fixture_tiny_vit():
    if not TINY_VIT.is_dir():
        pytest.skip(f"reference fixtures not found at {TINY_VIT}")
    expected = json.loads((TINY_VIT / "expected.json").read_text())
    state = torch.load(TINY_VIT / "openai_state_dict_fp32.pt", weights_only=True)
    inputs = torch.load(TINY_VIT / "inputs.pt", weights_only=True)
    cfg = CLIPConfig.from_dict({**expected["config_open_clip"], "quick_gelu": expected["quick_gelu"]})
    weights = {k: v.numpy() for k, v in state.items()}

    image = encode_image_numpy(weights, cfg.to_dict(), inputs["pixels"].numpy())
    text = encode_text_numpy(weights, cfg.to_dict(), inputs["token_ids"].numpy())
    assert np.abs(image - np.array(expected["image_features"])).max() <= TOL
    assert np.abs(text - np.array(expected["text_features"])).max() <= TOL


def test_resnet_config_is_refused():
    cfg = get_model_config("RN-Nano").to_dict()
    with pytest.raises(ValueError, match="ViT image towers only"):
        encode_image_numpy({}, cfg, np.zeros((1, 3, 64, 64)))


def test_bad_inputs_give_clear_errors():
    cfg = _tiny_config(0, quick_gelu=True)
    weights = _state_dict_numpy(_random_model(cfg, 0))
    config = cfg.to_dict()
    with pytest.raises(ValueError, match=r"pixels must be \[B, 3, 24, 24\]"):
        encode_image_numpy(weights, config, np.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="longer than the context length 77"):
        encode_text_numpy(weights, config, np.ones((1, 78), dtype=np.int64))
    with pytest.raises(ValueError, match="integer array"):
        encode_text_numpy(weights, config, np.ones((1, 10), dtype=np.float32))
    with pytest.raises(ValueError, match=r"must lie in \[0, 500\)"):
        encode_text_numpy(weights, config, np.full((1, 10), 500))
    missing = {k: v for k, v in weights.items() if k != "visual.ln_pre.bias"}
    with pytest.raises(KeyError, match=r"visual\.ln_pre\.bias"):
        encode_image_numpy(missing, config, np.zeros((1, 3, 24, 24)))
    with pytest.raises(ValueError, match="'vision' and 'quick_gelu'"):
        encode_image_numpy(weights, {"embed_dim": 24}, np.zeros((1, 3, 24, 24)))


def test_module_imports_numpy_only():
    tree = ast.parse(inspect.getsource(numpy_forward))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "collections", "math", "typing", "numpy"}, imported
