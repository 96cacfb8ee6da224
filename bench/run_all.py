"""Run every side-by-side benchmark in bench/ and write bench/results.json and bench/results.md.

    make bench                                   # installs bench/.venv-openclip first, then runs this
    bench/.venv-openclip/bin/python bench/run_all.py [--skip-recipe] [--only NAME,...] [--quick]

Each benchmark runs in its own process, one after the other, with the command shown in the results: the ones
that compare with open_clip 3.3.0 under the bench venv's Python (this one), the others (search, serve, eval,
onnx, and the training recipe, which compares with open_clip's recorded result) under `--main-python` (default:
.venv/bin/python, which has FAISS, onnxruntime, httpx and a loadable Lightning).
The scripts hand their headline figures to bench/_results.py, which appends them to a file this driver names
in the environment; everything a script prints is shown as it runs.

A benchmark whose input data is missing (../shared/data beside the repository) is recorded as skipped, one
that exits with an error or reports no figures as failed, with the reason; the others still run. The exit
status is 1 if any failed.

Duration on a 2-core CPU: roughly 25 to 30 minutes, plus 16 for the Flickr8k training recipe (`--skip-recipe`
leaves it out). The estimate printed at the start uses the durations in the previous results.json when
there is one. `--quick` runs every script with small sizes (a few minutes in all) to check the set-up; its
figures are marked as such and are not comparable with a full run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _openclip import DATA
from _results import ENV, OPEN_CLIP

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
REPRODUCE = "make bench"


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] = ()
    main_python: bool = False  # clipforge only: run with the project's venv (FAISS, onnxruntime, httpx)
    data: tuple[str, ...] = ()  # paths under ../shared/data that must exist
    modules: tuple[str, ...] = ()  # modules the interpreter must have
    minutes: float = 1.0  # rough duration of a full run on a 2-core CPU
    recipe: bool = False


BENCHMARKS = (
    Benchmark("tokenizer", "bench_tokenizer.py", quick_args=("--repeats", "1"),
              data=("flickr8k/captions.csv",), minutes=1),
    Benchmark("preprocess", "bench_preprocess.py", quick_args=("--flickr", "16", "--large", "2", "--repeats", "1"),
              data=("flickr8k/images",), minutes=2),
    Benchmark("encode", "bench_encode.py", quick_args=("--repeats", "1", "--batches", "1"), minutes=4),
    Benchmark("classify", "bench_classify.py", quick_args=("10",), data=("flowers/labels.csv",), minutes=5),
    Benchmark("embed", "bench_embed.py", quick_args=("--n", "16"), data=("flickr8k/images",), minutes=3),
    Benchmark("train-step", "bench_train.py", ("step",), ("step", "--steps", "1", "--batch", "16"), minutes=2),
    Benchmark("kernels", "bench_kernels.py", quick_args=("--repeats", "2"), main_python=True, minutes=2),
    Benchmark("search", "bench_search.py", quick_args=("--n", "20000", "--queries", "50"), main_python=True,
              modules=("faiss",), minutes=4),
    Benchmark("serve", "bench_serve.py", quick_args=("--requests", "40", "--images", "32"), main_python=True,
              modules=("faiss", "httpx", "fastapi", "uvicorn"), minutes=2),
    Benchmark("eval", "bench_eval.py", quick_args=("--images", "500", "--repeats", "1"), main_python=True,
              minutes=1),
    Benchmark("onnx", "bench_onnx.py", quick_args=("--arch", "ViT-Nano-8", "--repeats", "1"), main_python=True,
              modules=("onnx", "onnxruntime", "onnxscript"), minutes=3),
    # The recipe compares with open_clip's recorded result, and clipforge's trainer (Lightning, which imports
    # torchvision through torchmetrics) does not load in the bench venv: it runs with the project's venv.
    Benchmark("train-recipe", "bench_train.py", ("recipe",), ("recipe", "--minutes", "0.2"), main_python=True,
              data=("flickr8k/captions.csv", "flickr8k/images"), modules=("lightning",), minutes=16, recipe=True),
)


@dataclass
class Outcome:
    name: str
    command: str
    status: str = "ok"  # ok | skipped | failed
    reason: str | None = None
    wall_s: float = 0.0
    figures: list[dict] = field(default_factory=list)


def _relative(path: str | Path) -> str:
    """A path inside the repository relative to its root (commands read the same on every machine)."""
    try:
        return str(Path(path).absolute().relative_to(ROOT))
    except ValueError:
        return str(path)


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def machine() -> dict:
    """The CPU, core count, torch version and native bf16 support of this machine, and the date."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": None, "torch_threads": None, "native_bf16": None,
            "python": platform.python_version(), "open_clip": None,
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        import torch

        info["torch"], info["torch_threads"] = torch.__version__, torch.get_num_threads()
        info["native_bf16"] = bool(torch.cpu._is_avx512_bf16_supported())
    except (ImportError, AttributeError):
        pass
    with contextlib.suppress(metadata.PackageNotFoundError):  # an interpreter without open_clip
        info["open_clip"] = metadata.version("open_clip_torch")
    return info


def _missing_modules(python: str, modules: tuple[str, ...]) -> list[str]:
    if not modules:
        return []
    probe = ("import importlib.util, sys; "
             "print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))")
    out = subprocess.run([python, "-c", probe, *modules], capture_output=True, text=True, check=False)
    return out.stdout.split() if out.returncode == 0 else list(modules)


def _figures(path: Path) -> tuple[list[dict], str | None]:
    """The figures a script recorded, and its skip reason if it reported one."""
    figures, skipped = [], None
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if entry["kind"] == "skipped":
                skipped = entry["reason"]
                continue
            lower = entry["better"] == "lower"
            figures.append({
                "case": entry["case"], "clipforge": entry["clipforge"], "open_clip": entry["reference"],
                "ratio": entry["ratio"], "unit": entry["unit"], "better": entry["better"],
                "meaning": (f"{entry['better']} is better"
                            + (f"; ratio {'below' if lower else 'above'} 1 favours clipforge"
                               if entry["ratio"] is not None else "")),
                "compared_with": entry["reference_name"], "note": entry["note"],
            })
    return figures, skipped


def _kill_group(process: subprocess.Popen) -> None:
    """Ends a benchmark and whatever it started (servers, data-loader workers)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _run_process(argv: list[str], env: dict, timeout_s: float) -> tuple[int, list[str], bool]:
    """Runs argv in its own process group, passing its output through as it comes (progress bars included);
    (status, last lines, timed out)."""
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    expired = threading.Event()

    def kill() -> None:
        expired.set()
        _kill_group(process)

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    tail = b""
    try:
        while chunk := process.stdout.read1(1 << 16):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            tail = (tail + chunk)[-(1 << 14):]
        status = process.wait()
        if tail and not tail.endswith(b"\n"):
            print(flush=True)
    except KeyboardInterrupt:
        _kill_group(process)
        process.wait()
        raise
    finally:
        timer.cancel()
    lines = tail.decode("utf-8", errors="replace").replace("\r", "\n").splitlines()
    return status, lines[-30:], expired.is_set()


def _failure_reason(status: int, tail: list[str], timed_out: bool, timeout_s: float) -> str:
    if timed_out:
        return f"stopped after the time limit of {timeout_s / 60:g} minutes"
    lines = [line for line in tail if line.strip()]
    last = lines[-1].strip() if lines else ""
    if len(last) > 300:
        last = last[:297] + "..."
    return f"exit status {status}" + (f": {last}" if last else "")


def _argv(bench: Benchmark, python: str, quick: bool, scratch: Path) -> list[str]:
    args = list(bench.quick_args if quick else bench.args)
    if bench.recipe and quick:
        args += ["--output", str(scratch / "recipe-run")]
    return [python, str(BENCH / bench.script), *args]


def _shown(argv: list[str]) -> str:
    return shlex.join([_relative(argv[0]), _relative(argv[1]), *argv[2:]])


def run_one(bench: Benchmark, python: str, quick: bool, timeout_s: float, scratch: Path) -> Outcome:
    argv = _argv(bench, python, quick, scratch)
    outcome = Outcome(bench.name, _shown(argv))
    missing_data = [os.path.relpath(DATA / p, ROOT) for p in bench.data if not (DATA / p).exists()]
    if missing_data:
        outcome.status, outcome.reason = "skipped", f"input data not found: {', '.join(missing_data)}"
        return outcome
    missing = _missing_modules(python, bench.modules)
    if missing:
        outcome.status = "failed"
        outcome.reason = f"{_relative(python)} lacks {', '.join(missing)} (`make install` sets up .venv with them)"
        return outcome
    figures_file = scratch / f"{bench.name}.jsonl"
    env = {**os.environ, ENV: str(figures_file), "PYTHONUNBUFFERED": "1"}
    print(f"$ {outcome.command}", flush=True)
    start = time.perf_counter()
    status, tail, timed_out = _run_process(argv, env, timeout_s)
    outcome.wall_s = round(time.perf_counter() - start, 1)
    outcome.figures, skipped = _figures(figures_file)
    if skipped is not None and not outcome.figures:
        outcome.status, outcome.reason = "skipped", skipped
    elif status != 0 or timed_out:
        outcome.status, outcome.reason = "failed", _failure_reason(status, tail, timed_out, timeout_s)
    elif not outcome.figures:
        outcome.status, outcome.reason = "failed", "the script reported no figures"
    return outcome


def _value(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}" if abs(x) >= 0.01 else f"{x:.2g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(report: dict) -> str:
    m = report["machine"]
    bf16 = {True: "yes", False: "no", None: "unknown"}[m["native_bf16"]]
    lines = ["# Benchmark results", ""]
    if report["quick"]:
        lines += ["**Quick run with reduced sizes: a check of the set-up, not comparable with a full run.**", ""]
    lines += [
        f"clipforge against {OPEN_CLIP} (or the baseline named beside the figure), measured side by side on the "
        "same machine; each benchmark script's docstring describes its method.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, native CPU bf16: {bf16}; {m['date']}. "
        f"Whole run: {report['wall_s'] / 60:.1f} min.",
        "",
        f"Reproduce: `{report['command']}`" + (" (`BENCH_ARGS=--skip-recipe` leaves out the 15-minute training "
                                               "recipe)" if report["command"] == REPRODUCE else ""),
        "",
        "| benchmark | case | clipforge | open_clip | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for bench in report["benchmarks"]:
        for f in bench["figures"]:
            reference = f"{_value(f['open_clip'])} {f['unit']}" if f["open_clip"] is not None else "-"
            if f["compared_with"] not in (None, OPEN_CLIP):
                reference += f" ({f['compared_with']})"
            ratio = "-" if f["ratio"] is None else f"{f['ratio']:.2f}x" + (" (lower is better)"
                                                                          if f["better"] == "lower" else "")
            lines.append(f"| {bench['name']} | {_cell(f['case'])} | {_value(f['clipforge'])} {f['unit']} | "
                         f"{_cell(reference)} | {ratio} |")
    others = [b for b in report["benchmarks"] if b["status"] != "ok"]
    if others:
        lines += ["", "Not measured or incomplete:", ""]
        lines += [f"- {b['name']}: {b['status']}: {b['reason']}" for b in others]
    return "\n".join(lines) + "\n"


def _estimate(selected: list[Benchmark], previous: Path, quick: bool) -> str:
    if quick:
        return "a few minutes"
    last = {}
    try:
        old = json.loads(previous.read_text())
        if not old.get("quick"):
            last = {b["name"]: b["wall_s"] for b in old["benchmarks"] if b["status"] == "ok"}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    minutes = sum(last[b.name] / 60 if b.name in last else b.minutes for b in selected)
    source = "the previous run's durations where it has them" if last else "rough figures for a 2-core CPU"
    return f"about {minutes:.0f} minutes ({source})"


def _updated(previous: dict, report: dict) -> dict:
    """`previous` with the benchmarks of `report` replaced (or added, in the driver's order); the command and
    wall time stay those of the full run, and each replaced benchmark keeps the command that ran it."""
    fresh = {b["name"]: b for b in report["benchmarks"]}
    kept = {b["name"]: b for b in previous.get("benchmarks", [])}
    kept.update(fresh)
    order = [b.name for b in BENCHMARKS]
    merged = sorted(kept.values(), key=lambda b: order.index(b["name"]) if b["name"] in order else len(order))
    return {**previous, "machine": report["machine"], "benchmarks": merged,
            "updated": sorted(fresh), "quick": previous.get("quick", False) or report["quick"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-recipe", action="store_true", help="leave out the 15-minute Flickr8k training run")
    parser.add_argument("--only", help=f"comma-separated names: {', '.join(b.name for b in BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the set-up (a few minutes)")
    parser.add_argument("--main-python", default=None,
                        help="interpreter for the benchmarks that do not import open_clip "
                             "(default: .venv/bin/python if present)")
    parser.add_argument("--timeout", type=float, default=60, help="minutes one benchmark may run (default 60)")
    parser.add_argument("--json", type=Path, default=BENCH / "results.json", help="default: bench/results.json")
    parser.add_argument("--markdown", type=Path, default=BENCH / "results.md", help="default: bench/results.md")
    parser.add_argument("--update", action="store_true",
                        help="replace only the benchmarks run now in the existing results (e.g. with --only)")
    args = parser.parse_args()

    selected = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {b.name for b in BENCHMARKS})
        if unknown:
            parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
        selected = [b for b in BENCHMARKS if b.name in names]
    if args.skip_recipe:
        selected = [b for b in selected if not b.recipe]
    main_python = args.main_python or str(ROOT / ".venv" / "bin" / "python")
    if not Path(main_python).exists():
        main_python = sys.executable

    info = machine()
    print(f"{len(selected)} benchmarks on {info['cpu']} ({info['cores']} cores), torch {info['torch']}, "
          f"native CPU bf16: {info['native_bf16']}; estimated {_estimate(selected, args.json, args.quick)}",
          flush=True)
    outcomes: list[Outcome] = []
    started = time.perf_counter()
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="clipforge-bench-") as scratch:
        for i, bench in enumerate(selected, 1):
            python = main_python if bench.main_python else sys.executable
            print(f"\n[{i}/{len(selected)}] {bench.name} (elapsed {_clock(time.perf_counter() - started)})",
                  flush=True)
            try:
                outcome = run_one(bench, python, args.quick, args.timeout * 60, Path(scratch))
            except KeyboardInterrupt:
                outcomes.append(Outcome(bench.name, _shown(_argv(bench, python, args.quick, Path(scratch))),
                                        "failed", "interrupted"))
                interrupted = True
                break
            outcomes.append(outcome)
            n = len(outcome.figures)
            detail = f": {outcome.reason}" if outcome.reason else f", {n} figure{'' if n == 1 else 's'}"
            print(f"[{i}/{len(selected)}] {bench.name} {outcome.status} in {outcome.wall_s:.0f} s{detail} "
                  f"(elapsed {_clock(time.perf_counter() - started)})", flush=True)

    options = [*(["--quick"] if args.quick else []), *(["--skip-recipe"] if args.skip_recipe else []),
               *([f"--only={args.only}"] if args.only else [])]
    command = REPRODUCE + (f" BENCH_ARGS={shlex.quote(' '.join(options))}" if options else "")
    wall_s = round(time.perf_counter() - started, 1)
    report = {"command": command, "quick": args.quick, "wall_s": wall_s,
              "machine": info, "benchmarks": [vars(o) for o in outcomes]}
    if args.update and args.json.is_file():
        report = _updated(json.loads(args.json.read_text(encoding="utf-8")), report)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    args.markdown.write_text(markdown(report), encoding="utf-8")
    counts = collections.Counter(o.status for o in outcomes)
    print(f"\n{counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed in "
          f"{_clock(wall_s)}; wrote {_relative(args.json)} and {_relative(args.markdown)}")
    for o in outcomes:
        if o.status != "ok":
            print(f"  {o.name}: {o.status}: {o.reason}")
    if interrupted:
        return 130
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
