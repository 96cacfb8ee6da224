"""ONNX export: onnxruntime reproduces the torch encoders, the batch is dynamic, config.json is complete."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge import cli
from clipforge.cli import export as export_cli
from clipforge.export import DEFAULT_OPSET, _fp32_cpu_eval, export_onnx, first_eot_positions
from clipforge.tokenizer import Tokenizer

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

TOL = 1e-4
EOT, SOT = 49407, 49406
TEXTS = ["a photo of a cat", "", "a long caption that goes on " * 10]  # short, empty, truncated (eot kept last)


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of one graph by name."""
    sess = session(path)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True))


def run_image(paths, pixels: torch.Tensor) -> dict[str, np.ndarray]:
    return run(paths["image"], {"pixel_values": pixels.numpy()})


def run_text(paths, ids: torch.Tensor, dtype=np.int64) -> dict[str, np.ndarray]:
    return run(paths["text"], {"input_ids": ids.numpy().astype(dtype)})


def assert_close(onnx_out: np.ndarray, torch_out: torch.Tensor) -> None:
    assert onnx_out.shape == tuple(torch_out.shape) and onnx_out.dtype == np.float32
    assert np.abs(onnx_out - torch_out.numpy()).max() <= TOL


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """ViT-Nano-8 exported with the default (dynamo) exporter and int64 ids."""
    if importlib.util.find_spec("onnxscript") is None:
        pytest.skip("onnxscript (the dynamo exporter's dependency) is not installed")
    torch.manual_seed(0)
    model = clipforge.create_model("ViT-Nano-8").eval()
    return model, export_onnx(model, tmp_path_factory.mktemp("onnx") / "vit")


@pytest.mark.parametrize("batch", [1, 3])
def test_image_encoder_matches_torch_for_any_batch(vit, batch):
    model, paths = vit
    pixels = torch.randn(batch, 3, 64, 64)
    out = run_image(paths, pixels)
    with torch.no_grad():
        features = model.encode_image(pixels)
    assert_close(out["image_features"], features)
    assert_close(out["image_embeds"], F.normalize(features, dim=-1))
    assert np.allclose(np.linalg.norm(out["image_embeds"], axis=-1), 1, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_text_encoder_matches_torch_for_any_batch(vit, batch):
    model, paths = vit
    ids = clipforge.tokenize(TEXTS[:batch] if batch > 1 else ["a dog"], context_length=32)
    out = run_text(paths, ids)
    with torch.no_grad():
        features = model.encode_text(ids)
    assert_close(out["text_features"], features)
    assert_close(out["text_embeds"], F.normalize(features, dim=-1))


def test_text_pooling_takes_the_first_eot_like_the_model(vit):
    model, paths = vit
    ids = clipforge.tokenize(["a cat", "a dog on a mat", "x"], context_length=32)
    ids[0, 4:] = EOT  # padded with eot rather than zeros: the first one counts
    ids[1, 9:12] = EOT
    ids[2, :] = torch.arange(320, 352)  # no eot (nor sot) at all: pooled at the largest id, as the model does
    ids[2, 7] = 40000
    out = run_text(paths, ids)
    with torch.no_grad():
        expected = model.encode_text(ids)
        _, tokens = model.text(ids, return_tokens=True)
        at_first_eot, at_largest = tokens[0, 3] @ model.text.text_projection, tokens[2, 7] @ model.text.text_projection
    assert_close(out["text_features"], expected)
    assert np.abs(out["text_features"][0] - at_first_eot.numpy()).max() <= TOL
    assert np.abs(out["text_features"][2] - at_largest.numpy()).max() <= TOL


def test_first_eot_positions_when_eot_is_not_the_largest_id():
    # A vocabulary where eot is not the largest id: argmax(ids) would pick 50000's position.
    ids = torch.tensor([[SOT, 50000, EOT, 0], [SOT, 7, EOT, EOT], [SOT, 9, 50000, 3]], dtype=torch.int32)
    assert first_eot_positions(ids, EOT).tolist() == [2, 2, 2]
    assert first_eot_positions(ids.long(), EOT).tolist() == [2, 2, 2]


def test_graphs_declare_dynamic_batch_and_integer_safe_pooling(vit):
    _, paths = vit
    for role, name, elem in (("image", "pixel_values", onnx.TensorProto.FLOAT),
                             ("text", "input_ids", onnx.TensorProto.INT64)):
        graph = onnx.load(str(paths[role]))
        assert next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == DEFAULT_OPSET
        (inp,) = graph.graph.input
        assert (inp.name, inp.type.tensor_type.elem_type) == (name, elem)
        assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
        assert [o.name for o in graph.graph.output] == [f"{role}_embeds", f"{role}_features"]
    # Every ArgMax reads float32 (the type all runtimes implement), never the integer ids.
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(paths["text"])))
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    argmax_inputs = [node.input[0] for node in inferred.graph.node if node.op_type == "ArgMax"]
    assert argmax_inputs and all(types[name] == onnx.TensorProto.FLOAT for name in argmax_inputs)


def test_config_json_describes_everything_needed_to_run_the_graphs(vit):
    model, paths = vit
    config = json.loads(paths["config"].read_text())
    assert config["format"] == "clipforge-onnx" and config["export"]["opset"] == DEFAULT_OPSET
    assert config["preprocess"]["image_size"] == 64 and config["preprocess"]["interpolation"] == "bicubic"
    assert config["preprocess"]["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    tok = config["tokenizer"]
    assert (tok["context_length"], tok["sot_token_id"], tok["eot_token_id"], tok["pad_token_id"]) == (32, SOT, EOT, 0)
    assert (paths["config"].parent / tok["vocab_file"]) == paths["vocab"] and paths["vocab"].stat().st_size > 1e6
    assert clipforge.CLIPConfig.from_dict(config["model"]["config"]) == model.config
    assert config["model"]["logit_scale"] == pytest.approx(model.logit_scale.exp().item())
    assert config["model"]["parameters"] == sum(p.numel() for p in model.parameters())
    text = config["graphs"]["text"]
    assert (paths["config"].parent / text["file"]) == paths["text"]
    assert text["inputs"]["input_ids"] == {"dtype": "int64", "shape": ["batch", 32]}
    assert config["graphs"]["image"]["outputs"]["image_embeds"]["normalized"] is True
    assert sorted(p.name for p in paths["config"].parent.iterdir()) == sorted(p.name for p in paths.values())


def test_resnet_int32_ids_from_a_training_mode_model(tmp_path):
    torch.manual_seed(1)
    model = clipforge.create_model("RN-Nano").train()  # BatchNorm must be exported with running statistics
    rng = torch.get_rng_state()
    paths = export_onnx(model, tmp_path, ids_dtype="int32", exporter="torchscript")
    assert model.training  # the caller's mode is restored
    assert torch.equal(torch.get_rng_state(), rng)  # and its random state untouched
    model.eval()
    ids = clipforge.tokenize(TEXTS, context_length=32)
    graph = onnx.load(str(paths["text"]))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT32
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        image_features, text_features = model.encode_image(pixels), model.encode_text(ids)
    for batch in (1, 3):
        assert_close(run_image(paths, pixels[:batch])["image_features"], image_features[:batch])
        assert_close(run_text(paths, ids[:batch], np.int32)["text_features"], text_features[:batch])


def test_lower_precision_model_is_exported_from_an_fp32_copy():
    model = clipforge.create_model("ViT-Nano-8").set_precision("bf16").eval()
    with _fp32_cpu_eval(model) as fp32:
        assert fp32 is not model and fp32.precision == "fp32"
    assert model.precision == "bf16"


@pytest.mark.parametrize("kwargs,message", [
    ({"ids_dtype": "int16"}, "ids_dtype must be one of int64, int32"),
    ({"opset": 11, "exporter": "torchscript"}, "opset must be an int >= 14 with the torchscript exporter"),
    ({"opset": 17}, r"opset must be an int >= 18 with the dynamo exporter, got 17 \(exporter='torchscript'"),
    ({"exporter": "tflite"}, "exporter must be one of dynamo, torchscript"),
    ({"preprocess_cfg": {"image_size": 224}}, "preprocess image_size 224 does not match the model's 64"),
    ({"tokenizer_cfg": Tokenizer(77).to_config()}, "tokenizer context_length 77 is longer than the model's 32"),
])
def test_bad_arguments_are_refused_before_writing(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        export_onnx(clipforge.create_model("ViT-Nano-8"), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out" / "config.json").exists()


def test_missing_extra_names_the_install_command(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ImportError, match=r"onnxscript: pip install clipforge\[onnx\]"):
        export_onnx(clipforge.create_model("ViT-Nano-8"), tmp_path)
    assert cli_main(monkeypatch, ["export", "onnx", "--checkpoint", str(tmp_path), "--output", str(tmp_path)]) == 1
    assert "pip install clipforge[onnx]" in capsys.readouterr().err


def cli_main(monkeypatch, argv: list[str]) -> int:
    """`clipforge ARGV` with the export commands registered (whether or not cli/__init__ lists them yet)."""
    if not any(name == "export" for name, *_ in cli.COMMANDS):
        monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, *export_cli.COMMANDS])
    return cli.main(argv)


def test_cli_exports_a_saved_folder(tmp_path, monkeypatch, capsys):
    torch.manual_seed(2)
    model = clipforge.create_model("ViT-Nano-8").eval()
    folder = clipforge.save_model(model, tmp_path / "saved")
    out = tmp_path / "onnx"
    argv = ["export", "onnx", "--checkpoint", str(folder), "--output", str(out), "--opset", "17",
            "--ids-dtype", "int32", "--exporter", "torchscript"]
    assert cli_main(monkeypatch, argv) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines())
    paths = {role: out / name for role, name in (("image", "image_encoder.onnx"), ("text", "text_encoder.onnx"))}
    assert printed["image"] == str(paths["image"]) and printed["config"] == str(out / "config.json")
    config = json.loads((out / "config.json").read_text())
    assert config["export"]["opset"] == 17 and config["graphs"]["text"]["inputs"]["input_ids"]["dtype"] == "int32"
    assert config["model"]["provenance"]["source"] == str(folder)
    assert onnx.load(str(paths["text"])).opset_import[0].version == 17
    ids, pixels = clipforge.tokenize(TEXTS, context_length=32), torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert_close(run_text(paths, ids, np.int32)["text_embeds"], model.encode_text(ids, normalize=True))
        assert_close(run_image(paths, pixels)["image_embeds"], model.encode_image(pixels, normalize=True))


def test_reference_checkpoints_match_open_clip_outputs(reference_model, tmp_path):
    model, preprocess, tokenizer = clipforge.load(reference_model["folder"] / "openai_state_dict_fp32.pt")
    paths = export_onnx(model, tmp_path, preprocess.cfg, tokenizer.to_config(), exporter="torchscript")
    inputs, expected = reference_model["inputs"], reference_model["expected"]
    image = run_image(paths, inputs["pixels"])["image_features"]
    text = run_text(paths, inputs["token_ids"])["text_features"]
    assert np.abs(image - np.array(expected["image_features"])).max() <= 1e-5
    assert np.abs(text - np.array(expected["text_features"])).max() <= 1e-5
