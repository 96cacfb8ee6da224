"""HF transformers CLIPModel <-> our OpenAI layout: numerical parity, bit-exact round trips, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clipforge.checkpoints.hf import (
    clip_config_to_hf_config,
    hf_config_to_clip_config,
    hf_state_dict_to_openai,
    openai_state_dict_to_hf,
)
from clipforge.model import CLIP, CLIPConfig, TextConfig, VisionConfig, get_model_config

transformers = pytest.importorskip("transformers")

TOL = 1e-4
SOT, EOT = 49406, 49407
# OpenAI tokenizer ids of two Flickr8k captions ("A dog is running ." / "a dog runs across the ground .").
CAPTIONS = [[SOT, 320, 1929, 533, 2761, 269, EOT], [SOT, 320, 1929, 5586, 2500, 518, 2461, 269, EOT]]


def _token_ids(context: int) -> torch.Tensor:
    """OpenAI-shaped rows: [SOT, ..., EOT, 0, 0, ...]."""
    ids = torch.zeros(len(CAPTIONS), context, dtype=torch.long)
    for row, caption in enumerate(CAPTIONS):
        ids[row, : len(caption)] = torch.tensor(caption)
    return ids


def _hf_model(text: dict, vision: dict, projection_dim: int, act: str, seed: int):
    """A seeded random HF CLIPModel whose biases and LayerNorms are perturbed away from 0 / 1, so that a
    mix-up between any two tensors changes the outputs."""
    config = transformers.CLIPConfig(
        text_config={**text, "hidden_act": act}, vision_config={**vision, "hidden_act": act},
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _save_and_read(model, folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    model.save_pretrained(folder)
    return json.loads((folder / "config.json").read_text()), load_file(folder / "model.safetensors")


def _ours(cfg: CLIPConfig, sd: dict[str, torch.Tensor]) -> CLIP:
    with torch.device("meta"):
        model = CLIP(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def _pooled(out) -> torch.Tensor:
    # transformers < 5 returns the projected tensor; 5.x returns an output object holding it.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _max_diffs(hf_model, ours: CLIP, seed: int) -> tuple[float, float]:
    size, context = ours.config.vision.image_size, ours.config.text.context_length
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    ids = _token_ids(context)
    with torch.no_grad():
        hf_img = _pooled(hf_model.get_image_features(pixel_values=pixels))
        hf_txt = _pooled(hf_model.get_text_features(input_ids=ids))
        img, txt = ours.encode_image(pixels), ours.encode_text(ids)
    assert img.shape == hf_img.shape and txt.shape == hf_txt.shape
    # A sanity floor: features of two different inputs must differ (catches constant outputs).
    assert (img[0] - img[1]).abs().max() > 1e-2 and (txt[0] - txt[1]).abs().max() > 1e-2
    return (img - hf_img).abs().max().item(), (txt - hf_txt).abs().max().item()


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------ tiny models

TINY_TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 256,
             "max_position_embeddings": 77, "vocab_size": 49408}
TINY_VISION = {"hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 3, "intermediate_size": 384,
               "image_size": 32, "patch_size": 8}


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_tiny_hf_folder_matches_ours(tmp_path, act):
    hf_model = _hf_model(TINY_TEXT, TINY_VISION, 48, act, seed=1)
    hf_config, hf_sd = _save_and_read(hf_model, tmp_path)
    cfg = hf_config_to_clip_config(hf_config)
    assert cfg.quick_gelu == (act == "quick_gelu")
    assert (cfg.embed_dim, cfg.vision.width, cfg.vision.heads, cfg.text.heads) == (48, 96, 3, 2)
    ours = _ours(cfg, hf_state_dict_to_openai(hf_sd, cfg))
    assert ours.logit_scale.item() == hf_model.logit_scale.item()
    img_diff, txt_diff = _max_diffs(hf_model, ours, seed=2)
    assert img_diff < TOL and txt_diff < TOL, (img_diff, txt_diff)


@pytest.mark.parametrize("arch", ["ViT-Nano-8", "ViT-Nano-8-quickgelu"])
def test_ours_written_as_hf_folder_loads_in_transformers(tmp_path, arch):
    torch.manual_seed(3)
    ours = CLIP(get_model_config(arch)).eval()
    with torch.no_grad():
        for param in ours.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    hf_config = clip_config_to_hf_config(ours.config)
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    save_file(openai_state_dict_to_hf(ours.state_dict(), ours.config), tmp_path / "model.safetensors")
    hf_model, info = transformers.CLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf_model.config.text_config.eos_token_id == EOT
    assert hf_model.config.text_config.hidden_act == ("quick_gelu" if ours.config.quick_gelu else "gelu")
    img_diff, txt_diff = _max_diffs(hf_model.eval(), ours, seed=4)
    assert img_diff < TOL and txt_diff < TOL, (img_diff, txt_diff)
    # And the config we wrote reads back to the architecture we started from.
    assert hf_config_to_clip_config(hf_config) == ours.config


def test_configs_round_trip_for_shipped_vits():
    for arch in ("ViT-B-32", "ViT-B-16", "ViT-L-14-336", "ViT-Micro-8"):
        cfg = get_model_config(arch)
        assert hf_config_to_clip_config(clip_config_to_hf_config(cfg)) == cfg, arch


def test_legacy_openai_config_fields_are_read():
    # OpenAI's HF uploads: eos_token_id 2 (argmax pooling), and text_config_dict overriding text_config.
    hf_config = {
        "model_type": "clip", "projection_dim": 768,
        "text_config": {"eos_token_id": 2, "bos_token_id": 0, "pad_token_id": 1, "hidden_size": 512},
        "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                          "num_hidden_layers": 24, "patch_size": 14, "image_size": [336, 336]},
    }
    cfg = hf_config_to_clip_config(hf_config)
    assert cfg == get_model_config("ViT-L-14-336")


# ------------------------------------------------------------------------------------------ ViT-B/32

B32_TEXT = {"hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8, "intermediate_size": 2048}
B32_VISION = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
              "intermediate_size": 3072, "image_size": 224, "patch_size": 32}


@pytest.fixture(scope="module")
def b32(tmp_path_factory):
    hf_model = _hf_model(B32_TEXT, B32_VISION, 512, "quick_gelu", seed=0)
    hf_config, hf_sd = _save_and_read(hf_model, tmp_path_factory.mktemp("hf-b32"))
    return hf_model, hf_config, hf_sd


@pytest.mark.slow
def test_b32_hf_folder_matches_ours(b32):
    hf_model, hf_config, hf_sd = b32
    cfg = hf_config_to_clip_config(hf_config)
    assert cfg == get_model_config("ViT-B-32")
    img_diff, txt_diff = _max_diffs(hf_model, _ours(cfg, hf_state_dict_to_openai(hf_sd, cfg)), seed=5)
    assert img_diff < TOL and txt_diff < TOL, (img_diff, txt_diff)


@pytest.mark.slow
def test_b32_round_trips_are_bit_exact(b32):
    _, hf_config, hf_sd = b32
    cfg = hf_config_to_clip_config(hf_config)
    ours = hf_state_dict_to_openai(hf_sd, cfg)
    _assert_same_tensors(openai_state_dict_to_hf(ours, cfg), hf_sd)
    _assert_same_tensors(hf_state_dict_to_openai(openai_state_dict_to_hf(ours, cfg), cfg), ours)


def test_round_trip_keeps_dtype_and_is_bit_exact_in_fp16():
    cfg = get_model_config("ViT-Micro-8")
    torch.manual_seed(6)
    ours = {k: v.half() for k, v in CLIP(cfg).state_dict().items()}
    back = hf_state_dict_to_openai(openai_state_dict_to_hf(ours, cfg), cfg)
    _assert_same_tensors(back, ours)


# ------------------------------------------------------------------------------------------ prefixes

def test_prefixed_and_legacy_buffers_are_accepted():
    cfg = get_model_config("ViT-Micro-8")
    torch.manual_seed(7)
    ours = CLIP(cfg).state_dict()
    hf = openai_state_dict_to_hf(ours, cfg)
    hf["text_model.embeddings.position_ids"] = torch.arange(cfg.text.context_length)[None]
    positions = (cfg.vision.image_size // cfg.vision.patch_size) ** 2 + 1
    hf["vision_model.embeddings.position_ids"] = torch.arange(positions)[None]
    for prefix in ("", "clip.", "model."):
        back = hf_state_dict_to_openai({prefix + k: v for k, v in hf.items()}, cfg)
        _assert_same_tensors(back, ours)


# ------------------------------------------------------------------------------------------ bad input

@pytest.fixture(scope="module")
def micro():
    cfg = get_model_config("ViT-Micro-8")
    torch.manual_seed(8)
    ours = CLIP(cfg).state_dict()
    return cfg, ours, openai_state_dict_to_hf(ours, cfg)


def test_missing_hf_key_is_reported(micro):
    cfg, _, hf = micro
    hf = dict(hf)
    del hf["vision_model.encoder.layers.0.self_attn.k_proj.bias"]
    with pytest.raises(ValueError, match=r"weights\.safetensors: .*1 missing key.*0\.self_attn\.k_proj"):
        hf_state_dict_to_openai(hf, cfg, source="weights.safetensors")


def test_unexpected_hf_key_is_reported(micro):
    cfg, _, hf = micro
    hf = {**hf, "vision_model.head.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"1 unexpected key.*vision_model\.head\.weight"):
        hf_state_dict_to_openai(hf, cfg)


def test_wrong_hf_shape_is_reported(micro):
    cfg, _, hf = micro
    key = "vision_model.embeddings.position_embedding.weight"  # as if made for another image size
    hf = {**hf, key: hf[key][:50]}
    with pytest.raises(ValueError, match=r"wrong shape.*weight is \(50, 256\), expected \(65, 256\)"):
        hf_state_dict_to_openai(hf, cfg)


def test_hf_state_dict_for_other_architecture_is_refused(micro):
    _, _, hf = micro
    with pytest.raises(ValueError, match=r"not an HF CLIPModel state dict .*48 unexpected key"):
        hf_state_dict_to_openai(hf, get_model_config("ViT-Nano-8"))


def test_bad_openai_state_dicts_are_reported(micro):
    cfg, ours, _ = micro
    missing = {k: v for k, v in ours.items() if k != "visual.proj"}
    with pytest.raises(ValueError, match=r"1 missing key.*visual\.proj"):
        openai_state_dict_to_hf(missing, cfg)
    with pytest.raises(ValueError, match=r"1 unexpected key.*attn_mask"):
        openai_state_dict_to_hf({**ours, "attn_mask": torch.zeros(77, 77)}, cfg)
    wrong = {**ours, "logit_scale": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"logit_scale is \(1,\), expected \(\)"):
        openai_state_dict_to_hf(wrong, cfg)


def test_resnet_cannot_be_expressed_in_hf():
    with pytest.raises(ValueError, match="ModifiedResNet"):
        clip_config_to_hf_config(get_model_config("RN50"))
    with pytest.raises(ValueError, match="ModifiedResNet"):
        openai_state_dict_to_hf({}, get_model_config("RN50"))


@pytest.mark.parametrize(("change", "message"), [
    ({"model_type": "clipseg"}, "model_type is 'clipseg'"),
    ({"vision_config": {"hidden_act": "gelu"}}, "same activation in both towers"),
    ({"text_config": {"hidden_act": "relu"}, "vision_config": {"hidden_act": "relu"}}, "is 'relu'"),
    ({"text_config": {"eos_token_id": 1000}}, "eos_token_id is 1000"),
    ({"vision_config": {"layer_norm_eps": 1e-6}}, "layer_norm_eps"),
    ({"vision_config": {"image_size": [224, 320]}}, "only square"),
    ({"vision_config": {"num_channels": 1}}, "num_channels"),
    ({"text_config": {"hidden_size": 500, "num_attention_heads": 8}}, "not a multiple of num_attention"),
])
def test_unrepresentable_hf_configs_are_refused(change, message):
    hf_config = {"model_type": "clip", "text_config": {}, "vision_config": {}, **change}
    with pytest.raises(ValueError, match=message):
        hf_config_to_clip_config(hf_config)


def test_hf_defaults_fill_a_sparse_config():
    # Every missing key takes transformers' default, which is OpenAI's ViT-B/32.
    assert hf_config_to_clip_config({"model_type": "clip"}) == get_model_config("ViT-B-32")


def test_nonstandard_mlp_ratio_survives():
    cfg = CLIPConfig(embed_dim=32, vision=VisionConfig(image_size=32, layers=1, width=88, head_width=44,
                                                       patch_size=16, mlp_ratio=6144 / 1408),
                     text=TextConfig(context_length=16, width=32, heads=2, layers=1, mlp_ratio=2.5))
    hf_config = clip_config_to_hf_config(cfg)
    assert hf_config["vision_config"]["intermediate_size"] == int(88 * 6144 / 1408)
    assert hf_config["text_config"]["intermediate_size"] == 80
    assert hf_config_to_clip_config(hf_config).text.mlp_ratio == 2.5
