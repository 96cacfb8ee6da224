"""The core `clipforge` subcommands: output contracts, and one-line errors with the right exit status."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import clipforge
from clipforge.cli import main


@pytest.fixture(scope="module")
def saved_nano(tmp_path_factory):
    torch.manual_seed(0)
    return clipforge.save_model(clipforge.create_model("ViT-Nano-8"), tmp_path_factory.mktemp("m") / "nano")


def test_models_lists_every_architecture(capsys):
    assert main(["models", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["model"] for r in rows] == clipforge.list_models()
    b32 = next(r for r in rows if r["model"] == "ViT-B-32")
    assert b32["vision"]["patch_size"] == 32 and b32["embed_dim"] == 512


def test_models_pretrained_lists_registry(capsys):
    assert main(["models", "--pretrained", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {"model": "ViT-B-32", "pretrained": "openai"} in rows


def test_info_describes_a_saved_folder(saved_nano, capsys):
    assert main(["info", str(saved_nano), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "clipforge" and info["preprocess"]["image_size"] == 64
    assert info["parameters"] == sum(t.numel() for t in load_file(saved_nano / "model.safetensors").values())


@pytest.mark.parametrize("to,name", [("openai", "nano.pt"), ("hf", "nano-hf"), ("clipforge", "again")])
def test_convert_round_trips_bit_exact(saved_nano, tmp_path, capsys, to, name):
    assert main(["convert", str(saved_nano), str(tmp_path / name), "--to", to]) == 0
    assert main(["convert", str(tmp_path / name), str(tmp_path / "back")]) == 0
    original, back = load_file(saved_nano / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)


def test_tokenize_prints_the_tokenizer_ids(capsys):
    assert main(["tokenize", "a photo of a cat", "--context-length", "8", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["ids"] == clipforge.tokenize(["a photo of a cat"], context_length=8)[0][:7].tolist()
    assert row["ids"][0] == 49406 and row["ids"][-1] == 49407


@pytest.mark.parametrize("argv,message", [
    (["info", "no/such/file.pt"], "no/such/file.pt: no such file or folder"),
    (["convert", "ViT-B-99", "out"], "ViT-B-99: no such file or folder"),
])
def test_user_errors_are_one_line_with_status_1(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith(f"clipforge {argv[0]}: error:")


def test_corrupt_checkpoint_from_a_real_process_has_no_traceback(tmp_path):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"\x80\x02garbage" * 10)
    proc = subprocess.run([sys.executable, "-m", "clipforge", "info", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and str(bad) in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", "only-one-argument"])
    assert exc.value.code == 2
    assert "destination" in capsys.readouterr().err


def test_download_failures_and_worker_errors_are_one_line() -> None:
    from clipforge.checkpoints.pretrained import DownloadError, OfflineModeError
    from clipforge.cli import user_error_status as _user_error_status
    from clipforge.util import one_line as _one_line

    assert _user_error_status(DownloadError("x")) == 1 and _user_error_status(OfflineModeError("x")) == 1
    assert _user_error_status(KeyError("a bug")) is None  # bugs keep their traceback
    # What torch's DataLoader re-raises for an error in a worker process: the reason is on the last line.
    wrapped = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 1, in f\nValueError: data.csv line 3: empty caption")
    assert _one_line(wrapped) == "data.csv line 3: empty caption"
    assert _one_line(ValueError("first line\nsecond")) == "first line"
