import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.model import (
    CLIPConfig,
    ImageTower,
    PreprocessConfig,
    TextConfig,
    TextTower,
    VisionConfig,
    canonical_name,
    create_model,
    get_model_config,
    list_models,
    split_activation,
)
from clipforge.model import text as text_module

OPENAI_ARCHS = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"]


def tiny_config(resnet: bool = False) -> CLIPConfig:
    vision = VisionConfig(image_size=64, layers=[1, 1, 1, 1], width=16) if resnet else \
        VisionConfig(image_size=32, layers=2, width=64, patch_size=8)
    return CLIPConfig(embed_dim=32, vision=vision, text=TextConfig(context_length=16, width=64, heads=2, layers=2))


def test_shipped_architectures_include_openai_releases_and_small_ones():
    names = list_models()
    assert set(OPENAI_ARCHS) <= set(names)
    assert {"ViT-Nano-8", "ViT-Micro-8", "RN-Nano"} <= set(names)
    assert get_model_config("ViT-Nano-8").text.context_length == 32
    assert all(get_model_config(n).quick_gelu for n in OPENAI_ARCHS)


@pytest.mark.parametrize("name", OPENAI_ARCHS)
def test_openai_parameter_counts(name):
    # Parameter counts of OpenAI's released models: every tensor shape must be theirs.
    expected = {"RN50": 102_007_137, "RN101": 119_688_033, "RN50x4": 178_300_601, "RN50x16": 290_979_217,
                "RN50x64": 623_258_305, "ViT-B-32": 151_277_313, "ViT-B-16": 149_620_737,
                "ViT-L-14": 427_616_513, "ViT-L-14-336": 427_944_193}[name]
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_name_spellings_and_activation_suffixes():
    assert get_model_config("ViT-B/32") == get_model_config("ViT-B-32")
    assert get_model_config("ViT-L/14@336px").vision.image_size == 336
    assert get_model_config("ViT-B-32-gelu").quick_gelu is False
    assert get_model_config("ViT-Nano-8-quickgelu").quick_gelu is True
    with pytest.raises(ValueError, match="unknown architecture 'ViT-Z-99'"):
        get_model_config("ViT-Z-99")


def test_one_name_normalisation_for_every_spelling():
    assert canonical_name(" ViT-L/14@336px ") == canonical_name("ViT-L/14@336") == "ViT-L-14-336"
    assert split_activation("ViT-B/32-QuickGELU") == ("ViT-B-32", True)
    assert split_activation("RN50-gelu") == ("RN50", False)
    assert split_activation("ViT-L/14@336px") == ("ViT-L-14-336", None)


@pytest.mark.parametrize("resnet", [False, True], ids=["vit", "resnet"])
def test_towers_meet_their_contract(resnet):
    cfg = tiny_config(resnet)
    model = create_model(cfg).eval()
    assert isinstance(model.visual, ImageTower) and isinstance(model.text, TextTower)
    assert model.visual.output_dim == model.text.output_dim == model.embed_dim == cfg.embed_dim
    assert model.visual.image_size == model.image_size == cfg.vision.image_size
    # A model built from a config alone knows its preprocessing and tokenizer, and carries its (empty) history.
    assert model.preprocess_config == PreprocessConfig(image_size=cfg.vision.image_size)
    assert model.provenance == {}
    tokenizer = clipforge.Tokenizer.from_config(model.tokenizer_config())
    assert tokenizer.context_length == model.context_length == cfg.text.context_length
    images = torch.randn(2, 3, model.image_size, model.image_size)
    ids = tokenizer(["a dog", "a cat on a mat"])
    with torch.no_grad():
        assert model.visual(images).shape == model.text(ids).shape == (2, cfg.embed_dim)
        _, tokens = model.text(ids, return_tokens=True)
    assert tokens.shape[:2] == ids.shape
    # Lock groups cover every parameter of the tower exactly once, first to last.
    for tower in (model.visual, model.text):
        grouped = [p for group in tower.lock_groups() for item in group
                   for p in ([item] if isinstance(item, torch.nn.Parameter) else item.parameters())]
        assert sorted(map(id, grouped)) == sorted(map(id, tower.parameters()))


def test_state_dict_keeps_openai_layout_while_the_towers_are_attributes():
    model = create_model(tiny_config())
    names = {name for name, _ in model.named_parameters()}
    assert "text.token_embedding.weight" in names and "token_embedding.weight" not in names
    state = model.state_dict()
    assert "token_embedding.weight" in state and not any(k.startswith("text.") for k in state)
    other = create_model(tiny_config())
    assert not torch.equal(other.text.text_projection, model.text.text_projection)
    other.load_state_dict(state)  # strict: every OpenAI-named key finds its tensor
    assert torch.equal(other.text.text_projection, model.text.text_projection)
    with pytest.raises(RuntimeError, match=r"Missing key.*ln_final\.weight"):
        other.load_state_dict({k: v for k, v in state.items() if k != "ln_final.weight"})
    # Inside a wrapper (a LightningModule, DDP) the layout applies below the wrapper's prefix.
    wrapper = torch.nn.ModuleDict({"model": model})
    assert "model.text_projection" in wrapper.state_dict()
    wrapper.load_state_dict(wrapper.state_dict())


def test_seeded_models_draw_the_weights_they_always_drew():
    """The text tower is built first, so a seed gives the weights it gave before the towers became attributes;
    the values below were drawn by that earlier model."""
    torch.manual_seed(0)
    model = create_model(tiny_config())
    assert model.text.token_embedding.weight[0, :3].tolist() == pytest.approx([0.05941, -0.00688, 0.02286],
                                                                                  abs=1e-5)


def test_parameter_names_are_openai_layout():
    keys = set(create_model(tiny_config()).state_dict())
    for key in ["visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.proj",
                "visual.transformer.resblocks.0.attn.in_proj_weight",
                "visual.transformer.resblocks.0.attn.out_proj.bias",
                "visual.transformer.resblocks.1.mlp.c_fc.weight", "visual.ln_post.weight", "token_embedding.weight",
                "positional_embedding", "transformer.resblocks.1.ln_2.bias", "ln_final.weight", "text_projection",
                "logit_scale"]:
        assert key in keys
    rn_keys = set(create_model(tiny_config(resnet=True)).state_dict())
    assert {"visual.attnpool.q_proj.weight", "visual.attnpool.c_proj.bias", "visual.layer1.0.downsample.0.weight",
            "visual.layer4.0.bn3.running_var", "visual.bn1.weight"} <= rn_keys


def test_forward_returns_normalised_features_and_temperature():
    torch.manual_seed(0)
    model = create_model(tiny_config()).eval()
    images, ids = torch.randn(3, 3, 32, 32), clipforge.tokenize(["a", "b c"], context_length=16)
    img, txt, scale = model(images, ids)
    assert img.shape == (3, 32) and txt.shape == (2, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_text_pools_at_the_end_of_text_token():
    """Changing tokens after EOT (padding) must not change the embedding; changing one before must."""
    torch.manual_seed(0)
    model = create_model(tiny_config()).eval()
    ids = clipforge.tokenize(["a red circle"], context_length=16)
    eot = int(ids.argmax())
    padded = ids.clone()
    padded[0, eot + 1:] = 7
    before = ids.clone()
    before[0, 1] = 1000
    with torch.no_grad():
        base = model.encode_text(ids)
        assert torch.allclose(base, model.encode_text(padded), atol=1e-6)  # causal: later tokens unseen
        assert not torch.allclose(base, model.encode_text(before), atol=1e-3)


@pytest.mark.parametrize("resnet", [False, True])
def test_bf16_precision_keeps_fp32_interface_and_accuracy(resnet):
    torch.manual_seed(0)
    model = create_model(tiny_config(resnet)).eval()
    size = model.image_size
    images, ids = torch.randn(4, 3, size, size), clipforge.tokenize(["a dog", "two cats", "x"], context_length=16)
    with torch.no_grad():
        ref_img, ref_txt = model.encode_image(images), model.encode_text(ids)
        model.set_precision("bf16")
        assert model.precision == "bf16"
        assert model.text.ln_final.weight.dtype == torch.float32  # LayerNorm stays fp32
        img, txt = model.encode_image(images), model.encode_text(ids)
    assert img.dtype == txt.dtype == torch.float32
    assert F.cosine_similarity(img, ref_img).min() > 0.999
    assert F.cosine_similarity(txt, ref_txt).min() > 0.999


def test_bad_inputs_are_named():
    model = create_model(tiny_config()).eval()
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 32, 32\], got \(2, 3, 16, 16\)"):
        model.encode_image(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="longer than the model's context length 16"):
        model.encode_text(torch.zeros(1, 77, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model.encode_text(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="precision must be one of"):
        model.set_precision("int8")


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = create_model(tiny_config())
    images, ids = torch.randn(2, 3, 32, 32), clipforge.tokenize(["a", "b"], context_length=16)

    def grads():
        model.zero_grad()
        img, txt, _ = model(images, ids)
        (img @ txt.T).sum().backward()
        return model.visual.conv1.weight.grad.clone(), model.text.token_embedding.weight.grad.clone()

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_trimming_padding_after_the_last_eot_changes_nothing():
    """encode_text drops the columns after the batch's last EOT; the untrimmed path must agree."""
    torch.manual_seed(0)
    model = create_model(tiny_config()).eval()
    ids = clipforge.tokenize(["a dog", "two cats on a red sofa in the sun"], context_length=16)
    with torch.no_grad():
        trimmed = model.encode_text(ids)
        full, tokens = model.encode_text(ids, return_tokens=True)
    assert tokens.shape[1] == 16  # the token path keeps every column
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=0)  # float rounding of other GEMM shapes


@pytest.mark.parametrize("bucket", [1, 8, 256], ids=["no-bucket", "some-padding-kept", "all-padding-kept"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_unpadded_text_tower_matches_the_padded_one_with_gradients(bf16, bucket, monkeypatch):
    """encode_text runs the position-wise layers on the real tokens only (attention alone sees the padding), with
    the token count rounded up to a bucket by keeping some padding; features and every gradient must match the
    padded path's, which `return_tokens` takes."""
    monkeypatch.setattr(text_module, "_TOKEN_BUCKET", bucket)
    torch.manual_seed(0)
    model = create_model(tiny_config()).train()
    captions = ["a", "a dog runs on the beach", "two cats on a red sofa in the sun by the window", "x y"]
    ids = clipforge.tokenize(captions, context_length=16)
    target = torch.randn(len(captions), 32)

    def features_and_grads(padded: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            features = model.encode_text(ids, return_tokens=True)[0] if padded else model.encode_text(ids)
        (features.float() * target).sum().backward()
        return features.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    unpadded, unpadded_grads = features_and_grads(padded=False)
    padded, padded_grads = features_and_grads(padded=True)
    tolerance = {"atol": 2e-2, "rtol": 2e-2} if bf16 else {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(unpadded, padded, **tolerance)
    assert unpadded_grads.keys() == padded_grads.keys()
    assert "text.transformer.resblocks.0.attn.in_proj_weight" in padded_grads
    for name, grad in padded_grads.items():
        torch.testing.assert_close(unpadded_grads[name], grad, **tolerance, msg=name)
