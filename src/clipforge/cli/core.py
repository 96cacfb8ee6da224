"""The core subcommands: models, info, convert, tokenize, demo."""

from __future__ import annotations

import argparse
import json

from .common import EXIT_OK, Command


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
    from ..checkpoints import read_checkpoint
    from ..checkpoints.load import _configs_for

    raw = read_checkpoint(args.checkpoint)
    cfg, preprocess, _ = _configs_for(raw, args.model, None)
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
    from ..demo import run_demo

    return run_demo(args)


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


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="demo-output", help="folder for the demo's outputs")


COMMANDS: list[Command] = [
    ("models", "list architectures (or --pretrained weights)", _models_args, cmd_models),
    ("info", "describe a checkpoint: format, architecture, preprocessing", _info_args, cmd_info),
    ("convert", "rewrite a checkpoint as clipforge, HF or OpenAI (bit-exact)", _convert_args, cmd_convert),
    ("tokenize", "token ids of texts with OpenAI's BPE", _tokenize_args, cmd_tokenize),
    ("demo", "run the whole system end to end on generated data", _demo_args, cmd_demo),
]


