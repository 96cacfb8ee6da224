"""The user guide cannot drift from the code: the CLI reference is the parsers' help, the README's demo
thresholds are the demo's own."""

from __future__ import annotations

import re
from pathlib import Path

from clipforge.cli.reference import cli_reference
from clipforge.demo import THRESHOLDS

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_page_is_current() -> None:
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert page == cli_reference(), "docs/cli.md is stale: run `make docs` and commit it"


def test_cli_reference_covers_every_command_and_nested_command() -> None:
    page = cli_reference()
    for command in ("models", "info", "convert", "tokenize", "demo", "classify", "embed", "index", "search",
                    "serve", "train", "evaluate retrieval", "evaluate zeroshot", "evaluate linear-probe",
                    "evaluate suite", "export onnx"):
        assert f"## `clipforge {command}`" in page, command
    assert "--serve" in page and "--resume" in page  # options come through, not just the usage lines


def test_readme_states_the_demo_thresholds() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name, value in THRESHOLDS.items():
        assert re.search(rf"`{re.escape(name)}`[^\n]*?{value:.0%}", readme), (name, value)


def test_docs_links_resolve() -> None:
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).is_file(), f"{page.name} links to missing {target}"
