"""The CPU kernel choices clipforge's model and trainer make, each timed against the alternative it replaces.

    .venv/bin/python bench/bench_kernels.py [--repeats 20] [--threads N]

- attention for bf16 training (`model.layers.attention`): three plain ops against SDPA's fused kernel, forward and
  backward, on caption-length and ViT-B/32-length sequences;
- the ViT patch embedding in eval mode (`model.cpu_inference.PackedPatchEmbedding`): one packed matmul against
  the convolution it replaces, ViT-B/32 at batch 64 in fp32;
- channels-last activations for the ResNet image tower in bf16 training (`model.vision`), against NCHW, on the
  Flickr8k recipe's tower (RN-Nano at 96 px);
- the fused AdamW step the trainer uses on CPUs, against torch's default (foreach) step, on the recipe's model.

Each row is the best of `--repeats` timings in milliseconds (lower is better), the two sides taking turns so that
a slow spell of a shared machine falls on both.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _results
import clipforge
from clipforge.model import vision
from clipforge.model.layers import attention
from clipforge.train.config import load_config
from clipforge.train.models import build_model

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "flickr8k-cpu.yaml"


def _best_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up: first-call allocations and kernel selection
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: seconds * 1000 for name, seconds in best.items()}


def _report(case: str, ours: str, theirs: str, times: dict[str, float]) -> None:
    print(f"{case:<64} {ours} {times['ours']:8.2f} ms   {theirs} {times['theirs']:8.2f} ms   "
          f"{times['theirs'] / times['ours']:5.2f}x")
    _results.record(case, times["ours"], times["theirs"], unit="ms", better="lower", reference_name=theirs,
                    note=f"clipforge: {ours}")


def attention_rows(repeats: int) -> None:
    def step(fn: Callable, qkv: list[torch.Tensor], causal: bool) -> Callable[[], None]:
        def run() -> None:
            fn(*qkv, causal).float().square().sum().backward()
        return run

    def sdpa(q, k, v, causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    for shape, causal, what in (((384, 4, 32, 64), True, "captions, batch 384 x 4 heads x 32 tokens"),
                                ((128, 12, 50, 64), False, "ViT-B/32, batch 128 x 12 heads x 50 tokens")):
        qkv = [torch.randn(*shape).bfloat16().requires_grad_() for _ in range(3)]
        times = _best_ms({"ours": step(attention, qkv, causal), "theirs": step(sdpa, qkv, causal)}, repeats)
        _report(f"bf16 training attention forward+backward, {what}", "plain ops", "SDPA", times)


@torch.inference_mode()
def patch_embedding_row(repeats: int) -> None:
    model = clipforge.create_model("ViT-B-32").eval()  # eval mode: the packed patch embedding
    conv = model.visual.conv1
    images = torch.randn(64, 3, 224, 224)
    times = _best_ms({"ours": lambda: conv(images), "theirs": lambda: F.conv2d(images, conv.weight, stride=32)},
                     repeats)
    _report("ViT-B/32 patch embedding, fp32 inference, batch 64", "packed matmul", "convolution", times)


def channels_last_row(repeats: int) -> None:
    model = build_model(load_config(RECIPE).model)[0].train()
    size = model.image_size
    images = torch.randn(128, 3, size, size)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.encode_image(images).float().square().sum().backward()

    def nchw_step() -> None:
        chosen = vision._prefer_channels_last
        vision._prefer_channels_last = lambda x: False
        try:
            step()
        finally:
            vision._prefer_channels_last = chosen

    times = _best_ms({"ours": step, "theirs": nchw_step}, max(3, repeats // 4))
    _report(f"recipe ResNet tower, bf16 training forward+backward, batch 128 at {size} px", "channels-last",
            "NCHW", times)


def adamw_row(repeats: int) -> None:
    model = build_model(load_config(RECIPE).model)[0]
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    fused = torch.optim.AdamW(params, lr=1e-4, fused=True)
    plain = torch.optim.AdamW(params, lr=1e-4)
    times = _best_ms({"ours": fused.step, "theirs": plain.step}, repeats)
    _report(f"AdamW step, recipe model ({sum(p.numel() for p in params) / 1e6:.1f}M parameters)", "fused",
            "foreach", times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    torch.manual_seed(0)
    attention_rows(args.repeats)
    patch_embedding_row(args.repeats)
    channels_last_row(args.repeats)
    adamw_row(args.repeats)


if __name__ == "__main__":
    main()
