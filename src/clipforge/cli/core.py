"""The core subcommands: models, info, convert, tokenize, demo."""

from __future__ import annotations

import argparse
import json

from .common import EXIT_FAILED, EXIT_OK, Command, UsageError


def cmd_models(args: argparse.Namespace) -> int:
    from ..checkpoints.pretrained import list_pretrained
    from ..model import get_model_config, list_models

    if args.pretrained:
        rows = [{"model": arch, "pretrained": tag} for arch, tag in list_pretrained()]
        for row in rows:
            print(json.dumps(row) if args.json else f"{row['model']:<16} {row['pretrained']}")
        return EXIT_OK
    for name in list_models():
        cfg = get_model_config(name)
        v = cfg.vision
        tower = f"ResNet{list(v.layers)} width {v.width}" if v.is_resnet else \
            f"ViT {v.layers}x{v.width} patch {v.patch_size}"
        if args.json:
            print(json.dumps({"model": name, **cfg.to_dict()}))
        else:
            print(f"{name:<14} image {v.image_size:>3}px  {tower:<26} text {cfg.text.layers}x{cfg.text.width} "
                  f"ctx {cfg.text.context_length}  embed {cfg.embed_dim}")
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    from ..checkpoints import convert

    out = convert(args.source, args.destination, to=args.to, arch=args.model,
                  quick_gelu={"quick": True, "gelu": False, None: None}[args.activation])
    print(f"wrote {out} ({args.to})")
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    from ..checkpoints import checkpoint_configs, read_checkpoint

    raw = read_checkpoint(args.checkpoint)
    cfg, preprocess, _ = checkpoint_configs(raw, args.model)
    params = sum(t.numel() for t in raw.state_dict.values())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in raw.state_dict.values()})
    info = {"path": str(raw.path), "format": raw.kind, "parameters": params, "dtypes": dtypes,
            "model": cfg.to_dict(), "preprocess": preprocess.to_dict()}
    print(json.dumps(info, indent=None if args.json else 2))
    return EXIT_OK


def cmd_tokenize(args: argparse.Namespace) -> int:
    from ..tokenizer import Tokenizer

    tokenizer = Tokenizer(args.context_length)
    for text in args.texts:
        ids = [tokenizer.sot_token_id, *tokenizer.encode(text), tokenizer.eot_token_id][: args.context_length]
        ids[-1] = tokenizer.eot_token_id
        print(json.dumps({"text": text, "ids": ids}) if args.json else " ".join(map(str, ids)))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..demo import DemoSettings, run_demo

    if args.data and not Path(args.data).is_file():
        raise UsageError(f"--data {args.data}: no such file (give a CSV/TSV/Parquet caption table)")
    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, got {args.port}")
    output = Path(args.output)
    index = output / "index"
    if args.serve and (index / "index").is_dir() and not args.data:
        print(f"serving the index of the last demo run in {output} (delete the folder to run the demo again)")
        return _serve_demo(index, args)
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    settings = DemoSettings(image_col=args.image_col, caption_col=args.caption_col, steps=args.steps,
                            progress=not args.quiet)
    summary = run_demo(output, data=args.data, settings=settings)
    if args.serve:
        return _serve_demo(index, args)
    return EXIT_FAILED if summary["missed"] else EXIT_OK


def _serve_demo(index, args: argparse.Namespace) -> int:
    from ..search.index import SearchIndex, faiss_threads
    from ..search.server import serve

    opened = SearchIndex.open(index)
    faiss_threads(1)
    print(f"search page: http://{args.host}:{args.port or 8000}/   (Ctrl-C stops it)", flush=True)
    serve(opened, host=args.host, port=args.port or 8000, log_level="warning")
    return EXIT_OK


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pretrained", action="store_true", help="list named pretrained weights instead")
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="any checkpoint clipforge reads")
    p.add_argument("destination", help="output folder (clipforge, hf) or .pt file (openai)")
    p.add_argument("--to", default="clipforge", choices=["clipforge", "hf", "openai"])
    p.add_argument("--model", help="architecture name, when the weights alone cannot tell")
    p.add_argument("--activation", choices=["quick", "gelu"], help="QuickGELU or GELU (OpenCLIP files)")


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--model", help="architecture name, when the weights alone cannot tell")
    p.add_argument("--json", action="store_true", help="compact JSON")


def _tokenize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("texts", nargs="+")
    p.add_argument("--context-length", type=int, default=77)
    p.add_argument("--json", action="store_true")


DEMO_STEPS = 600  # DemoSettings.steps (not imported here: --help stays fast)


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="demo-output", help="folder for the demo's outputs (default: demo-output)")
    p.add_argument("--data", help="your own caption table (CSV/TSV/Parquet) instead of generated scenes")
    p.add_argument("--image-col", default="image_path", help="--data's image path column (default: image_path)")
    p.add_argument("--caption-col", default="caption", help="--data's caption column (default: caption)")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"training steps (default: {DEMO_STEPS})")
    p.add_argument("--serve", action="store_true",
                   help="serve the search page on the demo's index (runs the demo first if it has not run)")
    p.add_argument("--host", default="127.0.0.1", help="--serve: address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, help="--serve: port (default: 8000)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


COMMANDS: list[Command] = [
    ("models", "list architectures (or --pretrained weights)", _models_args, cmd_models),
    ("info", "describe a checkpoint: format, architecture, preprocessing", _info_args, cmd_info),
    ("convert", "rewrite a checkpoint as clipforge, HF or OpenAI (bit-exact)", _convert_args, cmd_convert),
    ("tokenize", "token ids of texts with OpenAI's BPE", _tokenize_args, cmd_tokenize),
    ("demo", "generate data, train, evaluate, index and report; --serve to search it", _demo_args, cmd_demo),
]


