import json
import pickle
import zipfile

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import clipforge
from clipforge.checkpoints import CheckpointError, convert, infer_config, read_checkpoint
from clipforge.model import create_model, list_models

from .conftest import REFERENCE


def features(model, inputs):
    with torch.no_grad():
        return model.encode_image(inputs["pixels"]), model.encode_text(inputs["token_ids"])


def max_diff(a, b) -> float:
    return (a - torch.tensor(b)).abs().max().item()


def test_fp32_state_dict_matches_reference(reference_model):
    model, _, tokenizer = clipforge.load(reference_model["folder"] / "openai_state_dict_fp32.pt")
    assert not model.training
    img, txt = features(model, reference_model["inputs"])
    assert max_diff(img, reference_model["expected"]["image_features"]) <= 1e-5
    assert max_diff(txt, reference_model["expected"]["text_features"]) <= 1e-5
    assert model.logit_scale.exp().item() == pytest.approx(reference_model["expected"]["logit_scale_exp"], rel=1e-6)
    captions = reference_model["expected"]["captions"]
    assert tokenizer(captions).tolist() == reference_model["expected"]["token_ids"]


def test_torchscript_fp16_archive_read_without_running_it(reference_model):
    raw = read_checkpoint(reference_model["folder"] / "openai_torchscript_fp16.pt")
    assert raw.kind == "openai-torchscript"
    assert "attn_mask" not in raw.state_dict and raw.state_dict["text_projection"].dtype == torch.float16
    model, _, _ = clipforge.load(reference_model["folder"] / "openai_torchscript_fp16.pt")
    assert model.text.text_projection.dtype == torch.float32  # fp16 weights become fp32 unless asked otherwise
    img, txt = features(model, reference_model["inputs"])
    assert max_diff(img, reference_model["expected"]["fp16_weights"]["image_features"]) <= 1e-4
    assert max_diff(txt, reference_model["expected"]["fp16_weights"]["text_features"]) <= 1e-4


def test_whole_path_image_file_to_embedding(reference_model):
    # The fixture's pixels came from the in-memory images before they were saved, so only the lossless
    # (PNG) files reproduce them; JPEG decoding is covered by the preprocessing parity test at 224 px.
    model, preprocess, _ = clipforge.load(reference_model["folder"] / "openai_state_dict_fp32.pt")
    expected = reference_model["expected"]
    rows = [i for i, name in enumerate(expected["images"]) if name.endswith(".png")]
    files = [REFERENCE / "images" / expected["images"][i] for i in rows]
    reference = [expected["image_embeds_normalized"][i] for i in rows]
    pixels = torch.stack([preprocess(Image.open(path)) for path in files])
    with torch.no_grad():
        img = model.encode_image(pixels, normalize=True)
    assert len(rows) == 4 and max_diff(img, reference) <= 1e-4
    embeddings = clipforge.embed_images(model, files, preprocess, batch_size=3, progress=False)
    assert embeddings.indices == list(range(len(files)))
    assert max_diff(embeddings.embeddings, reference) <= 1e-4


@pytest.mark.parametrize("layout", ["openclip_train", "bin", "safetensors", "ddp_prefixed"])
def test_openclip_layouts_give_identical_models(reference_model, tmp_path, layout):
    sd = torch.load(reference_model["folder"] / "openai_state_dict_fp32.pt", weights_only=True)
    path = tmp_path / {"openclip_train": "epoch_3.pt", "bin": "open_clip_pytorch_model.bin",
                       "safetensors": "open_clip_model.safetensors", "ddp_prefixed": "ddp.pt"}[layout]
    if layout == "openclip_train":
        torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                    "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}}, path)
    elif layout == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif layout == "ddp_prefixed":
        torch.save({f"module._orig_mod.{k}": v for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)
    model, _, _ = clipforge.load(path)
    img, txt = features(model, reference_model["inputs"])
    assert max_diff(img, reference_model["expected"]["image_features"]) <= 1e-5
    assert max_diff(txt, reference_model["expected"]["text_features"]) <= 1e-5


def test_round_trips_are_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = create_model("ViT-Nano-8").eval()
    clipforge.save_model(model, tmp_path / "ours")
    convert(tmp_path / "ours", tmp_path / "hf", to="hf")
    convert(tmp_path / "hf", tmp_path / "back", to="clipforge")
    convert(tmp_path / "back", tmp_path / "openai.pt", to="openai")
    convert(tmp_path / "openai.pt", tmp_path / "again", to="clipforge", arch="ViT-Nano-8")
    original = model.state_dict()
    for restored in (load_file(str(tmp_path / "back" / "model.safetensors")),
                     torch.load(tmp_path / "openai.pt", weights_only=True),
                     load_file(str(tmp_path / "again" / "model.safetensors"))):
        assert set(restored) == set(original)
        assert all(torch.equal(restored[k], original[k]) for k in original)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model"] == model.config.to_dict()
    assert set(config) >= {"model", "preprocess", "tokenizer", "provenance"}
    assert config["provenance"]["source_format"] == "hf"


def test_torchscript_to_clipforge_keeps_fp16_bits(tmp_path):
    folder = REFERENCE / "models" / "tiny-vit"
    if not folder.exists():
        pytest.skip("reference data not available")
    convert(folder / "openai_torchscript_fp16.pt", tmp_path / "out")
    original = read_checkpoint(folder / "openai_torchscript_fp16.pt").state_dict
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(saved[k].dtype == torch.float16 and torch.equal(saved[k], original[k]) for k in original)


def test_saved_folder_loads_with_its_own_preprocessing(tmp_path):
    torch.manual_seed(0)
    model = create_model("RN-Nano").eval()
    clipforge.save_model(model, tmp_path / "m", provenance={"note": "test"})
    loaded, preprocess, tokenizer = clipforge.load(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    assert preprocess(Image.new("RGB", (100, 80))).shape == (3, 64, 64)
    assert tokenizer(["a"]).shape == (1, 32)
    assert loaded.provenance["note"] == "test"
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))


@pytest.mark.parametrize("name", list_models())
def test_architecture_inferred_from_weights(name):
    with torch.device("meta"):
        model = create_model(name)
    inferred = infer_config(model.state_dict(), quick_gelu=model.config.quick_gelu)
    assert inferred == model.config


def test_precision_option_returns_fp32_embeddings(reference_model):
    model, _, _ = clipforge.load(reference_model["folder"] / "openai_state_dict_fp32.pt", precision="bf16")
    img, _ = features(model, reference_model["inputs"])
    assert img.dtype == torch.float32
    ref = torch.tensor(reference_model["expected"]["image_features"])
    assert torch.nn.functional.cosine_similarity(img, ref).min() > 0.999


def test_corrupt_truncated_and_foreign_files_get_clear_errors(tmp_path):
    torch.manual_seed(0)
    good = tmp_path / "good.pt"
    torch.save(create_model("ViT-Nano-8").state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\x01not a checkpoint" * 100)
    foreign = tmp_path / "foreign.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, foreign)
    for path, message in [(truncated, "could not read the checkpoint"), (garbage, "could not read the checkpoint"),
                          (foreign, "not a CLIP checkpoint in OpenAI's layout"),
                          (tmp_path / "missing.pt", "no such file or folder")]:
        with pytest.raises(CheckpointError, match=message) as info:
            clipforge.load(path)
        assert str(path) in str(info.value)


def test_mismatched_architecture_is_named(tmp_path):
    path = tmp_path / "nano.pt"
    torch.save(create_model("ViT-Nano-8").state_dict(), path)
    with pytest.raises(CheckpointError, match="weights do not fit the ViT w768 L12 p32"):
        clipforge.load(path, arch="ViT-B-32")
    with pytest.raises(CheckpointError, match="is an architecture, not weights: pass pretrained="):
        clipforge.load("ViT-B-32")


def test_torchscript_reader_refuses_foreign_globals(tmp_path):
    """An archive whose pickle names anything but tensors and module stubs is refused, not executed."""

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    archive = tmp_path / "evil.pt"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
        zf.writestr("evil/code/__torch__/m.py", "def forward(self): pass\n")
    with pytest.raises(CheckpointError, match=r"evil.pt: refusing to load (__builtin__|builtins)\.print"):
        read_checkpoint(archive)
