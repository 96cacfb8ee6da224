"""`clipforge embed`, `index`, `search` and `serve`: a collection -> embeddings -> index -> queries.

The shell only: arguments, messages and exit codes; the work is `clipforge.search`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .common import EXIT_OK, Command, UsageError, add_model_args, load_from_args

# Each command imports what it runs inside its function: the search modules load torch (the server FastAPI, a
# multi-process run Lightning), which `clipforge --help` and every other command should not wait for.


def cmd_embed(args: argparse.Namespace) -> int:
    from ..search.writer import EmbedSettings, embed_collection

    settings = _embed_settings(args)
    if args.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {args.workers}")
    if args.devices < 1 or args.num_nodes < 1:
        raise UsageError("--devices and --num-nodes must be at least 1")
    rank, world_size, barrier = _distributed(args)
    model, preprocess, tokenizer = load_from_args(args, fast_preprocess=not args.exact)
    quiet = args.quiet or rank != 0
    report = embed_collection(
        args.sources, args.output, model, preprocess, tokenizer, EmbedSettings(**settings),
        checkpoint=args.checkpoint or args.model, pretrained=args.pretrained if not args.checkpoint else None,
        num_workers=args.workers, overwrite=args.overwrite, progress=not quiet and sys.stderr.isatty(),
        log=(lambda line: None) if quiet else None, rank=rank, world_size=world_size, barrier=barrier)
    if rank != 0:
        return EXIT_OK
    if world_size > 1:
        from ..search.store import read_manifest

        counts = read_manifest(args.output)["counts"]
        state = "complete" if counts["parts_done"] == counts["parts"] else "incomplete"
        rate = (report.items_embedded + report.items_failed) / max(report.seconds, 1e-9)
        print(f"{args.output}: {world_size} processes; store {state}: {counts['vectors']} image(s) embedded, "
              f"{counts['failed']} unreadable, in {counts['parts_done']} part(s); rank 0 ran at {rate:.1f} images/s",
              file=sys.stderr)
        return EXIT_OK
    done = report.items_embedded + report.items_failed
    print(f"{args.output}: {report.parts_written} part(s) written, {report.items_embedded} image(s) embedded, "
          f"{report.items_failed} unreadable, {done / max(report.seconds, 1e-9):.1f} images/s", file=sys.stderr)
    for failure in report.failures[:10]:
        print(f"  skipped {failure['path']}: {failure['reason']}", file=sys.stderr)
    return EXIT_OK


def _distributed(args: argparse.Namespace):
    """(rank, world size, barrier): one process unless --devices/--num-nodes ask for more or a launcher (torchrun,
    SLURM) started several. Lightning Fabric starts the local processes and sets up the process group; each rank
    then runs on its own device (cuda:LOCAL_RANK with --device cuda)."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.devices == 1 and args.num_nodes == 1 and not launched:
        return 0, 1, None
    from lightning.fabric import Fabric

    gpu = args.device.startswith("cuda")
    fabric = Fabric(accelerator="cuda" if gpu else "cpu", devices=args.devices, num_nodes=args.num_nodes,
                    strategy="ddp")
    fabric.launch()
    if gpu:
        args.device = str(fabric.device)
    return fabric.global_rank, fabric.world_size, fabric.barrier


def _embed_settings(args: argparse.Namespace) -> dict:
    """Settings from the command line; when resuming, what the command leaves out comes from the store."""
    from ..search.store import MANIFEST, read_manifest
    from ..search.writer import DEFAULT_PART_SIZE

    stored = {}
    if not args.overwrite and os.path.exists(os.path.join(args.output, MANIFEST)):
        stored = read_manifest(args.output)["settings"]
    defaults = {"part_size": DEFAULT_PART_SIZE, "batch_size": 64, "image_col": "image_path", "caption_col": "caption"}
    settings = {name: getattr(args, name) if getattr(args, name) is not None else stored.get(name, default)
                for name, default in defaults.items()}
    for name in ("part_size", "batch_size"):
        if settings[name] < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {settings[name]}")
    return settings


def cmd_index(args: argparse.Namespace) -> int:
    from ..search.index import build_index

    params = build_index(args.store, memory_budget=args.memory_budget, kind=args.kind,
                         flat_threshold=args.flat_threshold, nlist=args.nlist, nprobe=args.nprobe)
    described = f"{params.kind} index of {params.vectors:,} x {params.dim}"
    if params.nlist:
        described += f", nlist {params.nlist}, nprobe {params.nprobe}"
    print(f"{args.store}: {described}, about {params.estimated_bytes / 2**20:.1f} MiB, built in "
          f"{params.extra['build_seconds']:.1f} s", file=sys.stderr)
    return EXIT_OK


def cmd_search(args: argparse.Namespace) -> int:
    from ..search.index import SearchIndex

    given = [x is not None for x in (args.text, args.image, args.like)]
    if sum(given) != 1:
        raise UsageError("give exactly one query: TEXT, --image PATH or --like ID")
    if args.k < 1:
        raise UsageError(f"-k must be at least 1, got {args.k}")
    index = SearchIndex.open(args.index, checkpoint=args.checkpoint, device=args.device)
    if args.text is not None:
        hits, query = index.search_text(args.text, args.k), {"text": args.text}
    elif args.image is not None:
        hits, query = index.search_image(args.image, args.k), {"image": args.image}
    else:
        hits, query = index.search_similar(args.like, args.k), {"like": args.like}
    if args.json:
        print(json.dumps({"query": query, "k": args.k, "results": [h.to_dict() for h in hits]}))
        return EXIT_OK
    for rank, hit in enumerate(hits, start=1):
        print(f"{rank:>3}  {hit.score:.4f}  {hit.path}" + (f"  {hit.caption}" if hit.caption else ""))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from ..search.index import SearchIndex, faiss_threads
    from ..search.server import serve
    from ..search.service import Limits

    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, got {args.port}")
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_k=args.max_k)
    index = SearchIndex.open(args.index, checkpoint=args.checkpoint, device=args.device)
    faiss_threads(1)  # concurrent requests each search on one core instead of all fighting over all
    print(f"serving {len(index):,} items from {args.index} on http://{args.host}:{args.port}/", file=sys.stderr)
    serve(index, host=args.host, port=args.port, limits=limits, log_level="warning" if args.quiet else "info")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ arguments


def _embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="image folder(s), one caption table (.csv/.tsv/.parquet) or WebDataset .tar shards "
                        "({000..009} ranges expand)")
    p.add_argument("--output", required=True, help="store folder (created; an unfinished one is resumed)")
    add_model_args(p)
    p.add_argument("--part-size", type=int, help="items per part file (default 10000; resume keeps the store's)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="decoding worker processes (default: min(4, CPU cores))")
    p.add_argument("--exact", action="store_true", help="decode JPEGs at full size (default: fast draft decode)")
    p.add_argument("--image-col", help="caption table column with image paths (default image_path)")
    p.add_argument("--caption-col", help="caption table column with captions (default caption)")
    p.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    p.add_argument("--devices", type=int, default=1,
                   help="processes on this machine, each embedding its share of the parts (one per GPU with "
                        "--device cuda; default 1)")
    p.add_argument("--num-nodes", type=int, default=1, help="machines taking part (launch with torchrun or SLURM)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


# Copies of clipforge.search.index.KINDS / DEFAULT_FLAT_THRESHOLD (a test keeps them equal): importing the index
# module here would load torch and FAISS just to print --help.
KINDS = ("auto", "flat", "ivf", "ivf-sq8", "ivf-pq", "hnsw")
DEFAULT_FLAT_THRESHOLD = 100_000


def _index_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="a finished store folder (from `clipforge embed`)")
    p.add_argument("--kind", default="auto", choices=KINDS, help="index type (default: planned from size and budget)")
    p.add_argument("--memory-budget", help="largest index to build, e.g. 2G or 512M (default: no limit)")
    p.add_argument("--flat-threshold", type=int, default=DEFAULT_FLAT_THRESHOLD,
                   help=f"exact search up to this many vectors (default {DEFAULT_FLAT_THRESHOLD:,})")
    p.add_argument("--nlist", type=int, help="IVF cells (default 4 * sqrt(N))")
    p.add_argument("--nprobe", type=int, help="IVF cells visited per query (default max(8, nlist / 64))")


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="?", help="text query")
    p.add_argument("--index", required=True, metavar="STORE", help="an indexed store folder")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--image", help="search by this image instead of text")
    p.add_argument("--like", type=int, metavar="ID", help="search for items like the stored item ID")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--checkpoint", help="model to embed the query (default: the one the store was made with)")
    p.add_argument("--device", default="cpu")


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, metavar="STORE", help="an indexed store folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--checkpoint", help="model to embed queries (default: the one the store was made with)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest image upload (default 10 MB)")
    p.add_argument("--max-k", type=int, default=100, help="most results per query (default 100)")
    p.add_argument("--quiet", action="store_true", help="log warnings only")


COMMANDS: list[Command] = [
    ("embed", "embed an image collection (folder, caption table, WebDataset) into a resumable store",
     _embed_args, cmd_embed),
    ("index", "build the vector index of an embedding store", _index_args, cmd_index),
    ("search", "search an indexed store by text, image or item", _search_args, cmd_search),
    ("serve", "serve an indexed store over HTTP with a web page", _serve_args, cmd_serve),
]
