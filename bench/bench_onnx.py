"""CPU throughput of the exported ONNX encoders (onnxruntime) vs the torch model they came from.

    .venv/bin/python bench/bench_onnx.py [--arch ViT-B-32] [--repeats 5] [--threads 2] [--exporter dynamo]

One randomly initialised model (fixed seed) is exported with `clipforge.export.export_onnx`, so both sides
hold the same fp32 weights; the largest difference between their outputs is printed to show it. Cases:
image encoding at batch 1 and 16, text encoding at batch 64. Each case is warmed up once, then timed
`repeats` times over a few calls, torch and onnxruntime alternating so that both see the same background
load; the best repeat of each is reported (other processes may share the CPU).
`ratio` is onnxruntime's items/s over torch's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

import _results

CASES = (("image", 1, 8), ("image", 16, 1), ("text", 64, 1))  # (tower, batch, calls per timed repeat)
CAPTIONS = ["a photo of a dog", "a red car parked on a quiet street at night", "two people hiking up a snowy "
            "mountain under a clear blue sky", "a bowl of fruit", "an aerial view of a city by the sea with boats"]


def _best_rates(calls_a: Callable[[], object], calls_b: Callable[[], object], batch: int, calls: int,
                repeats: int) -> tuple[float, float]:
    """Items per second of the fastest of `repeats` timed runs of `calls` calls, for two functions.

    Their runs alternate, so that both see the same background load; each is warmed up once first."""
    timings: list[list[float]] = [[], []]
    for fn in (calls_a, calls_b):
        fn()
    for _ in range(repeats):
        for fn, times in zip((calls_a, calls_b), timings, strict=True):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append(time.perf_counter() - start)
    return batch * calls / min(timings[0]), batch * calls / min(timings[1])


def _case(model, session, tower: str, batch: int, calls: int, repeats: int) -> dict:
    """Both runtimes on one tower and batch size."""
    import clipforge

    if tower == "image":
        torch_input = torch.randn(batch, 3, model.image_size, model.image_size)
        encode, feed = model.encode_image, {"pixel_values": torch_input.numpy()}
    else:
        texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
        torch_input = clipforge.tokenize(texts, context_length=model.context_length)
        encode, feed = model.encode_text, {"input_ids": torch_input.numpy()}
    output = [f"{tower}_features"]
    with torch.inference_mode():
        torch_rate, onnx_rate = _best_rates(lambda: encode(torch_input), lambda: session.run(output, feed),
                                            batch, calls, repeats)
        expected = encode(torch_input).numpy()
    got = session.run(output, feed)[0]
    return {"tower": tower, "batch": batch, "torch_per_s": round(torch_rate, 2),
            "onnxruntime_per_s": round(onnx_rate, 2), "ratio": round(onnx_rate / torch_rate, 2),
            "max_abs_diff": float(np.abs(got - expected).max())}


def run(arch: str = "ViT-B-32", repeats: int = 5, threads: int = 2, exporter: str = "dynamo") -> dict:
    """Throughput of torch and onnxruntime for each case, and their ratio."""
    import onnxruntime as ort

    import clipforge
    from clipforge.export import export_onnx

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = clipforge.create_model(arch).eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    result: dict = {"benchmark": "onnx", "arch": arch, "threads": threads, "exporter": exporter,
                    "onnxruntime_version": ort.__version__, "torch_version": torch.__version__, "cases": []}
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        paths = export_onnx(model, folder, exporter=exporter)
        result["export_s"] = round(time.perf_counter() - start, 1)
        sessions = {tower: ort.InferenceSession(str(paths[tower]), options, providers=["CPUExecutionProvider"])
                    for tower in ("image", "text")}
        for tower, batch, calls in CASES:
            result["cases"].append(_case(model, sessions[tower], tower, batch, calls, repeats))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case; the best is reported")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for both runtimes")
    parser.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    args = parser.parse_args()
    result = run(args.arch, args.repeats, args.threads, args.exporter)
    print(f"{result['arch']} fp32, {result['threads']} threads, torch {result['torch_version']}, onnxruntime "
          f"{result['onnxruntime_version']}, {result['exporter']} export {result['export_s']} s")
    print(f"{'case':<16}{'torch items/s':>15}{'onnxruntime items/s':>21}{'ratio':>8}{'max abs diff':>14}")
    for case in result["cases"]:
        name = f"{case['tower']} batch {case['batch']}"
        print(f"{name:<16}{case['torch_per_s']:>15.2f}{case['onnxruntime_per_s']:>21.2f}{case['ratio']:>7.2f}x"
              f"{case['max_abs_diff']:>14.2e}")
        _results.record(f"{result['arch']} {case['tower']} batch {case['batch']}, ONNX export on onnxruntime",
                        case["onnxruntime_per_s"], case["torch_per_s"], unit=f"{case['tower']}s/s",
                        ratio=case["ratio"], reference_name="the same model in torch",
                        note=f"{result['exporter']} export; max |diff| {case['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
