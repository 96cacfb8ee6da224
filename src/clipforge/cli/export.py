"""The export subcommands: `clipforge export onnx`."""

from __future__ import annotations

import argparse
import sys

from .common import EXIT_FAILED, EXIT_OK, Command, add_model_args, load_from_args


def cmd_export(args: argparse.Namespace) -> int:
    """Dispatch on the target format (only ONNX so far)."""
    return _export_onnx(args)


def _export_onnx(args: argparse.Namespace) -> int:
    from ..export import export_onnx, require_onnx

    try:  # before loading the model: a missing extra should not cost a model load
        require_onnx(args.exporter)
    except ImportError as err:
        print(f"clipforge export: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    model, preprocess, tokenizer = load_from_args(args)
    opset = {} if args.opset is None else {"opset": args.opset}
    paths = export_onnx(model, args.output, preprocess_cfg=preprocess.cfg, tokenizer_cfg=tokenizer.to_config(),
                        ids_dtype=args.ids_dtype, exporter=args.exporter, **opset)
    for role, path in paths.items():
        print(f"{role:<10} {path}")
    return EXIT_OK


def _export_args(p: argparse.ArgumentParser) -> None:
    # Literal choices rather than imports from clipforge.export: building the parser must not import torch.
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    onnx = formats.add_parser("onnx", help="image and text encoder graphs plus config.json, for onnxruntime",
                              description="Write image_encoder.onnx, text_encoder.onnx (dynamic batch; outputs "
                                          "L2-normalised *_embeds and raw *_features) and config.json.")
    add_model_args(onnx)
    onnx.set_defaults(precision="fp32")  # the graphs hold fp32 weights whatever the model was loaded as
    onnx.add_argument("--output", required=True, help="folder for the graphs and config.json")
    onnx.add_argument("--opset", type=int, help="ONNX opset (default: 18; the dynamo exporter needs 18 or newer)")
    onnx.add_argument("--ids-dtype", default="int64", choices=["int64", "int32"],
                      help="integer type of the text graph's input_ids (default: int64)")
    onnx.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"],
                      help="torch's exporter: dynamo (default, needs onnxscript) or the older, faster torchscript")


COMMANDS: list[Command] = [
    ("export", "export a model for other runtimes (export onnx)", _export_args, cmd_export),
]
