"""The CPU fast paths: packed/fused oneDNN linears for inference, plain attention and channels-last
convolutions for training. Each must compute what the plain torch path computes."""

import copy

import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.model import CLIPConfig, TextConfig, VisionConfig, cpu_inference, create_model, layers

needs_kernels = pytest.mark.skipif(not cpu_inference._kernels_available(torch.float32),
                                   reason="oneDNN linear kernels unavailable in this torch build")
needs_bf16_kernels = pytest.mark.skipif(not cpu_inference._kernels_available(torch.bfloat16),
                                        reason="no native bf16 on this CPU: the bf16 kernels stay off")


def vit_config(quick_gelu: bool = True) -> CLIPConfig:
    return CLIPConfig(embed_dim=32, quick_gelu=quick_gelu,
                      vision=VisionConfig(image_size=32, layers=2, width=64, patch_size=8),
                      text=TextConfig(context_length=16, width=64, heads=2, layers=2))


def inputs(model):
    size = model.image_size
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    return images, clipforge.tokenize(["a dog", "two cats on a mat", "x"], context_length=16)


@pytest.fixture
def count_fast_calls(monkeypatch):
    calls = []
    real = cpu_inference.fast_linear

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_inference, "fast_linear", counting)
    return calls


def encode_both(model, images, ids):
    return model.encode_image(images), model.encode_text(ids)


def plain_outputs(model, images, ids, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(cpu_inference, "_kernels_available", lambda dtype: False)
        return encode_both(model, images, ids)


def test_eval_mode_swaps_in_the_packed_layers_and_train_mode_puts_the_plain_ones_back():
    model = create_model(vit_config())
    plain_types = {name: type(m) for name, m in model.named_modules()}
    keys = list(model.state_dict())
    model.eval()
    block = model.visual.transformer.resblocks[0]
    assert type(block.attn) is cpu_inference.PackedAttention and type(block.mlp) is cpu_inference.PackedMLP
    assert type(model.text.transformer.resblocks[1].mlp) is cpu_inference.PackedMLP
    assert type(model.visual.conv1) is cpu_inference.PackedPatchEmbedding
    assert list(model.state_dict()) == keys  # same parameters, same names
    model.train()
    assert {name: type(m) for name, m in model.named_modules()} == plain_types


@needs_kernels
def test_training_mode_never_takes_the_packed_path(count_fast_calls):
    torch.manual_seed(0)
    model = create_model(vit_config()).eval().train()
    images, ids = inputs(model)
    with torch.no_grad():  # no gradient, yet training: the plain layers compute it (as the training step will)
        encode_both(model, images, ids)
    assert not count_fast_calls


@needs_kernels
@pytest.mark.parametrize("quick_gelu", [True, False])
def test_fp32_fast_path_matches_plain_ops(quick_gelu, count_fast_calls, monkeypatch):
    torch.manual_seed(0)
    model = create_model(vit_config(quick_gelu)).eval()
    images, ids = inputs(model)
    with torch.inference_mode():
        reference = plain_outputs(model, images, ids, monkeypatch)
        assert not count_fast_calls
        fast = encode_both(model, images, ids)
    # patch embedding + per block: in_proj, out_proj, c_fc (fused activation), c_proj; both towers
    assert len(count_fast_calls) == 1 + 2 * 2 * 4
    for got, want in zip(fast, reference, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@needs_bf16_kernels
def test_bf16_fast_path_matches_plain_ops(count_fast_calls, monkeypatch):
    torch.manual_seed(0)
    model = create_model(vit_config()).eval()
    images, ids = inputs(model)
    with torch.no_grad():
        fp32 = encode_both(model, images, ids)
        model.set_precision("bf16")
        reference = plain_outputs(model, images, ids, monkeypatch)
        fast = encode_both(model, images, ids)
    assert count_fast_calls
    for got, want, exact in zip(fast, reference, fp32, strict=True):
        assert got.dtype == torch.float32
        assert F.cosine_similarity(got, want).min() > 0.9999
        assert F.cosine_similarity(got, exact).min() > 0.999


@needs_bf16_kernels
def test_bf16_fast_path_is_no_further_from_fp32_than_plain_bf16(monkeypatch):
    """The fused QuickGELU scales activations, not the bf16 weights (which would round them twice): its error
    against fp32 stays at the plain bf16 path's level."""
    torch.manual_seed(0)
    model = create_model(CLIPConfig(embed_dim=64, vision=VisionConfig(image_size=64, layers=4, width=256,
                                                                      patch_size=16),
                                    text=TextConfig(context_length=16, width=64, heads=2, layers=1))).eval()
    images = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    ids = clipforge.tokenize(["a dog"], context_length=16)
    with torch.no_grad():
        exact = model.encode_image(images)
        model.set_precision("bf16")
        fast = model.encode_image(images)
        plain, _ = plain_outputs(model, images, ids, monkeypatch)

    def error(x):
        return (1 - F.cosine_similarity(x, exact)).mean().item()

    assert error(fast) <= 1.5 * error(plain), (error(fast), error(plain))


@needs_kernels
def test_packed_weights_follow_parameter_changes(monkeypatch):
    """load_state_dict, in-place edits and dtype changes must all reach the packed copies."""
    torch.manual_seed(0)
    model = create_model(vit_config()).eval()
    other = create_model(vit_config()).eval()
    images, ids = inputs(model)
    with torch.inference_mode():
        encode_both(model, images, ids)  # fills the cache with the first weights
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        got = encode_both(model, images, ids)
        want = plain_outputs(other, images, ids, monkeypatch)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)

    with torch.no_grad():
        model.visual.transformer.resblocks[0].mlp.c_fc.weight.mul_(2)
        got = model.encode_image(images)
        want, _ = plain_outputs(model, images, ids, monkeypatch)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@needs_kernels
def test_packed_weights_follow_a_fused_optimizer_after_a_mode_switch(monkeypatch):
    """Fused AdamW and writes through .data leave the version counter alone; the train()/eval() switch that
    every training loop makes before a no-gradient pass must still bring the new weights in."""
    torch.manual_seed(0)
    model = create_model(vit_config()).eval()
    images, ids = inputs(model)
    with torch.no_grad():
        before = model.encode_image(images)  # packs the initial weights
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model.encode_image(images).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        model.visual.transformer.resblocks[1].mlp.c_proj.weight.data.mul_(3)
    model.eval()
    with torch.no_grad():
        got = model.encode_image(images)
        want, _ = plain_outputs(model, images, ids, monkeypatch)
    assert (got - before).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@needs_kernels
def test_gradients_autocast_and_copies_take_the_plain_path(count_fast_calls):
    torch.manual_seed(0)
    model = create_model(vit_config()).eval()
    images, ids = inputs(model)
    image_features = model.encode_image(images)  # grad enabled, trainable weights: autograd needs torch's ops
    image_features.sum().backward()
    assert model.visual.conv1.weight.grad is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.encode_text(ids)  # autocast picks the compute dtype itself
    assert not count_fast_calls

    with torch.no_grad():
        model.encode_image(images)
    assert count_fast_calls
    twin = copy.deepcopy(model)  # the cache lives outside the module: copies and state dicts stay plain
    assert set(twin.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(twin.encode_image(images), model.encode_image(images))


def test_training_attention_matches_sdpa_in_bf16():
    """The plain attention used for bf16 training on CPU: same outputs and gradients as SDPA, causal or not."""
    torch.manual_seed(0)
    for causal in (False, True):
        q, k, v = (torch.randn(4, 2, 9, 16) for _ in range(3))
        reference = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        leaves = [t.bfloat16().requires_grad_() for t in (q, k, v)]
        out = layers.attention(*leaves, causal=causal)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)
        out.float().square().sum().backward()
        exact = [t.clone().requires_grad_() for t in (q, k, v)]
        F.scaled_dot_product_attention(*exact, is_causal=causal).square().sum().backward()
        for got, want in zip(leaves, exact, strict=True):
            assert F.cosine_similarity(got.grad.float().flatten(), want.grad.flatten(), dim=0) > 0.999


def test_resnet_training_forward_matches_inference_forward():
    """Training runs the ResNet on channels-last activations; the function must not change."""
    torch.manual_seed(0)
    model = create_model(CLIPConfig(embed_dim=32, vision=VisionConfig(image_size=64, layers=[1, 1, 1, 1], width=16),
                                    text=TextConfig(context_length=16, width=64, heads=2, layers=2))).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        reference = model.encode_image(images)
    features = model.encode_image(images)
    features.sum().backward()
    assert model.visual.conv1.weight.grad.is_contiguous()  # parameters keep their layout
    torch.testing.assert_close(features.detach(), reference, atol=1e-5, rtol=1e-4)
