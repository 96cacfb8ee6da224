"""`clipforge train`: contrastive training or fine-tuning from a YAML run file, flags and `--set` overrides."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from .common import EXIT_OK, Command, UsageError, run_command


def _threads(text: str) -> int | str:
    return text if text == "auto" else int(text)


# flag -> (config key, type, help). Applied after the YAML file, before --set.
_FLAGS: list[tuple[str, str, type, str]] = [
    ("--train-data", "data.train", str, "caption table (image_path,caption), image folder, or shards {000..009}.tar"),
    ("--val-data", "data.val", str, "held-out caption table for the per-epoch retrieval validation"),
    ("--workers", "data.workers", int, "DataLoader worker processes"),
    ("--train-num-samples", "data.train_num_samples", int, "WebDataset: samples per epoch"),
    ("--model", "model.arch", str, "architecture to train from scratch (e.g. ViT-Nano-8)"),
    ("--init", "model.init", str, "fine-tune from a checkpoint clipforge.load reads (path, or NAME:TAG)"),
    ("--embed-dim", "model.embed_dim", int, "joint embedding width"),
    ("--image-size", "model.image_size", int, "input resolution"),
    ("--vision-width", "model.vision_width", int, "image tower width"),
    ("--vision-layers", "model.vision_layers", int, "image tower depth (ViT)"),
    ("--patch-size", "model.patch_size", int, "ViT patch size"),
    ("--text-width", "model.text_width", int, "text tower width"),
    ("--text-layers", "model.text_layers", int, "text tower depth"),
    ("--context-length", "model.context_length", int, "text context length (tokens)"),
    ("--lock-image-unlocked-groups", "model.lock_image_unlocked_groups", int, "with --lock-image: train the last N"),
    ("--lock-text-unlocked-layers", "model.lock_text_unlocked_layers", int, "with --lock-text: train the last N"),
    ("--epochs", "optim.epochs", int, "passes over the training data"),
    ("--batch-size", "optim.batch_size", int, "per device and micro-batch"),
    ("--accum-freq", "optim.accum_freq", int, "micro-batches per step (negatives span all of them)"),
    ("--lr", "optim.lr", float, "peak learning rate"),
    ("--warmup", "optim.warmup", int, "linear warmup steps"),
    ("--wd", "optim.wd", float, "weight decay (matrices only)"),
    ("--max-steps", "optim.max_steps", int, "stop after this many optimizer steps"),
    ("--max-minutes", "optim.max_minutes", float, "stop after this much wall time (the schedule follows it)"),
    ("--loss", "loss.kind", str, "clip (InfoNCE) or siglip"),
    ("--precision", "run.precision", str, "auto, 32-true, bf16-mixed or 16-mixed"),
    ("--devices", "run.devices", int, "devices per node"),
    ("--num-nodes", "run.num_nodes", int, "nodes (with torchrun / SLURM)"),
    ("--strategy", "run.strategy", str, "auto, ddp, ddp_spawn, ... (not fsdp yet)"),
    ("--accelerator", "run.accelerator", str, "auto, cpu, gpu"),
    ("--output", "run.output", str, "run folder (checkpoints, logs, final model)"),
    ("--seed", "run.seed", int, "random seed"),
    ("--threads", "run.threads", _threads, "CPU threads for torch, or 'auto' (1 when the machine is busy)"),
]
_SWITCHES: list[tuple[str, str, str]] = [
    ("--lock-image", "model.lock_image", "freeze the image tower (LiT)"),
    ("--lock-text", "model.lock_text", "freeze the text tower"),
    ("--grad-checkpointing", "model.grad_checkpointing", "recompute activations in backward (less memory)"),
    ("--local-loss", "loss.local_loss", "score local rows against the global batch only"),
    ("--no-progress", "run.progress", "no progress bar"),
]


def config_from_args(args: argparse.Namespace):
    """The run's TrainConfig: the YAML file (or, resuming, the run's saved config), then flags, then --set."""
    from ..train.config import apply_overrides, config_from_dict, read_config_file

    source = args.config
    if source is None and args.resume and args.output:
        saved = Path(args.output) / "config.yaml"
        source = str(saved) if saved.is_file() else None
    data = read_config_file(source) if source else {}
    overrides = [f"{key}={_yaml_value(getattr(args, _dest(flag)))}" for flag, key, _, _ in _FLAGS
                 if getattr(args, _dest(flag)) is not None]
    overrides += [f"{key}={'false' if flag == '--no-progress' else 'true'}" for flag, key, _ in _SWITCHES
                  if getattr(args, _dest(flag))]
    try:
        return config_from_dict(apply_overrides(data, overrides + list(args.set or [])), source or "config")
    except ValueError as err:
        raise UsageError(str(err)) from None


def _yaml_value(value) -> str:
    return json.dumps(value)  # JSON is YAML: strings stay strings ("123" paths, "null")


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def cmd_train(args: argparse.Namespace) -> int:
    from ..train.run import train

    cfg = config_from_args(args)
    summary = train(cfg, resume=args.resume)
    if summary.get("global_rank", 0) != 0:
        return EXIT_OK  # one report per run, from rank 0
    val = summary.get("validation") or {}
    recalls = "  ".join(f"{k.split('_')[0][:4]}@{k.rsplit('@', 1)[1]}={v:.3f}" for k, v in val.items() if "@" in k)
    print(f"trained {summary['steps']} steps in {summary['train_seconds']:.0f} s; final model: {summary['final']}")
    if recalls:
        print(f"validation (image=text->image, text=image->text): {recalls}")
    bad = summary["bad_items"]
    if bad["bad"]:
        first = "; ".join(f"{e['item']}: {e['reason']}" for e in bad["examples"][:3])
        print(f"skipped {bad['bad']} of {bad['seen']} training items; first: {first}")
    return EXIT_OK


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run file (YAML: model/data/optim/loss/run sections)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override any config key (repeatable), e.g. --set optim.lr=1e-3")
    p.add_argument("--resume", metavar="latest|PATH",
                   help="continue a run: 'latest' (OUTPUT/checkpoints/last.ckpt) or a checkpoint file")
    for flag, _, kind, help_text in _FLAGS:
        p.add_argument(flag, type=kind, help=help_text)
    for flag, _, help_text in _SWITCHES:
        p.add_argument(flag, action="store_true", help=help_text)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `clipforge train` with these arguments (errors as the `clipforge` command reports them): the entry
    point of `python -m clipforge.cli.train`, which torchrun and SLURM launch once per process."""
    parser = argparse.ArgumentParser(prog="clipforge train")
    _train_args(parser)
    args = parser.parse_args(argv)
    return run_command("train", lambda: cmd_train(args))


COMMANDS: list[Command] = [
    ("train", "train or fine-tune a CLIP (contrastive; YAML run file, flags, --set)", _train_args, cmd_train),
]


if __name__ == "__main__":
    raise SystemExit(main())
