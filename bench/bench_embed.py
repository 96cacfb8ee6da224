"""End-to-end embedding of real photos: `clipforge embed`'s store path vs a straightforward open_clip loop.

    bench/.venv-openclip/bin/python bench/bench_embed.py [--n 1000] [--threads N] [--workers 2]

Same random ViT-B/32 weights in both (built by clipforge, loaded into open_clip's `ViT-B-32-quickgelu`), the
first `--n` Flickr8k photos (sorted by name), the same number of torch threads, in one process:

- open_clip: its eval preprocess in a `DataLoader` (batch 64, 2 workers), fp32, `encode_image`, normalise,
  collect the embeddings in memory;
- clipforge: `embed_collection` as `clipforge embed FOLDER --checkpoint DIR --output STORE` runs it (the
  model loaded from a saved folder with the automatic precision, fast JPEG decode, a DataLoader with
  `--workers` decoding processes, batch 64), including listing the folder, reading image headers and
  writing the float16 store.

Prints images/s for both, the ratio (target >= 2), and the cosine between the two embeddings of each photo.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _results
import clipforge
from _openclip import DATA, import_open_clip
from clipforge.model import auto_precision, cpu_has_native_bf16
from clipforge.search.store import EmbeddingStore
from clipforge.search.writer import EmbedSettings, embed_collection


class _Photos(Dataset):
    def __init__(self, paths: list[Path], preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(Image.open(self.paths[i]).convert("RGB"))


@torch.no_grad()
def _open_clip_loop(model, preprocess, paths: list[Path], batch_size: int) -> tuple[float, np.ndarray]:
    loader = DataLoader(_Photos(paths, preprocess), batch_size=batch_size, num_workers=2)
    start = time.perf_counter()
    rows = [F.normalize(model.encode_image(x), dim=-1) for x in loader]
    seconds = time.perf_counter() - start
    return len(paths) / seconds, torch.cat(rows).numpy()


def _clipforge_store(folder: Path, checkpoint: Path, output: Path, batch_size: int, workers: int):
    start = time.perf_counter()
    model, preprocess, tokenizer = clipforge.load(checkpoint, precision=auto_precision(), fast_preprocess=True)
    report = embed_collection([str(folder)], output, model, preprocess, tokenizer,
                              EmbedSettings(part_size=10_000, batch_size=batch_size), checkpoint=str(checkpoint),
                              num_workers=workers, progress=False, log=lambda line: None)
    seconds = time.perf_counter() - start
    store = EmbeddingStore.open(output)
    paths = [Path(p).name for p in store.metadata()["path"].to_pylist()]
    return report.items_embedded / seconds, store.vectors(), paths, model.precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="photos to embed (default 1000)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workers", type=int, default=2, help="clipforge's decoding workers (default 2)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    images = DATA / "flickr8k" / "images"
    if not images.is_dir():
        _results.skip(f"{images} not found (real photos live in ../shared/data beside the repo)")
        raise SystemExit(f"needs the Flickr8k photos in {images}")
    torch.set_num_threads(args.threads)
    open_clip = import_open_clip()
    paths = sorted(images.glob("*.jpg"))[: args.n]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        ours = clipforge.create_model("ViT-B-32").eval()
        checkpoint = clipforge.save_model(ours, tmp / "vit-b-32")
        theirs, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32-quickgelu", pretrained=None)
        missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
        if [k for k in missing if k != "attn_mask"] or unexpected:
            raise SystemExit(f"state dicts differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
        theirs.eval()
        del ours
        folder = tmp / "photos"  # exactly the chosen photos, as a folder `clipforge embed` reads
        folder.mkdir()
        for path in paths:
            (folder / path.name).symlink_to(path)

        print(f"{len(paths)} Flickr8k photos, ViT-B/32 (random weights), torch {torch.__version__}, "
              f"{args.threads} threads, native CPU bf16: {cpu_has_native_bf16()}")
        ref_rate, ref = _open_clip_loop(theirs, preprocess, paths, args.batch_size)
        print(f"open_clip loop  (fp32, DataLoader 2 workers)      {ref_rate:8.1f} images/s")
        rate, vectors, names, precision = _clipforge_store(folder, checkpoint, tmp / "store", args.batch_size,
                                                           args.workers)
        print(f"clipforge embed ({precision}, {args.workers} workers, store written) {rate:8.1f} images/s")
        order = {p.name: i for i, p in enumerate(paths)}
        ref = ref[[order[name] for name in names]]
        cosine = np.sum(ref * vectors, axis=1)
        print(f"ratio {rate / ref_rate:.2f}x; cosine clipforge vs open_clip per photo: min {cosine.min():.5f}, "
              f"mean {cosine.mean():.5f}")
        _results.record(f"{len(paths)} Flickr8k photos to a store ({precision}, {args.workers} workers)", rate,
                        ref_rate, unit="images/s", note=f"cosine to open_clip: min {cosine.min():.5f}")


if __name__ == "__main__":
    main()
