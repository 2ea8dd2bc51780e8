"""The model card (``README.md`` of a merged adapter) shows every untrusted string as text:
an input folder named to forge a table row, inject HTML or open a comment that hides the
real sha256 table is rendered as its name, in its own cell (issue 22 §5)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from jobs.spec import MergeSpec
from tests.conftest import edit_config
from worker.merge.output import code_span
from worker.merge.runner import run_merge

markdown_it = pytest.importorskip("markdown_it")

#: Names an attacker can give an input folder (the card's "input" column) or a base model.
HOSTILE = [
    "x`|1|8|`ffff`|<img src=x onerror=alert(1)>",
    "a<!--b",
    "``<script>alert(1)</script>``",
    "tab\there|",
    "\u202eevil",
]


def render(card: str):
    """The card's body as a GitHub-flavoured renderer parses it (tables and raw HTML on)."""
    body = card.removeprefix("---\n").partition("\n---\n")[2]
    md = markdown_it.MarkdownIt("commonmark", {"html": True}).enable("table")
    return md.parse(body), md.render(body)


@pytest.mark.parametrize("name", HOSTILE)
def test_a_code_span_is_one_inert_piece_of_text(name: str) -> None:
    md = markdown_it.MarkdownIt("commonmark", {"html": True}).enable("table")
    html = md.render(f"| a | b |\n|---|---|\n| {code_span(name, cell=True)} | 2 |\n")
    assert html.count("<td>") == 2 and "<img" not in html and "<script" not in html
    assert "<!--" not in html and "<code>" in html


def test_hostile_names_stay_text_in_the_card(peft_adapters: list[Path], tmp_path: Path) -> None:
    good = peft_adapters[0]
    folders = []
    for i, name in enumerate(["x`|1|8|`ffff`|<img src=x onerror=alert(1)>", "a<!--b"]):
        folder = tmp_path / f"in{i}" / name
        shutil.copytree(good, folder)
        folders.append(folder)
    edit_config(folders[1], base_model_name_or_path=None)
    edit_config(folders[0], base_model_name_or_path=None)
    spec = MergeSpec.model_validate(
        {"adapters": [{"uri": str(f)} for f in folders], "method": "ta",
         "output": {"uri": str(tmp_path / "out")}}
    )  # fmt: skip
    outcome = run_merge(spec, folders, tmp_path / "out", device="cpu")
    card = (tmp_path / "out" / "README.md").read_text()
    tokens, html = render(card)
    rows = [t for t in tokens if t.type == "tr_open"]
    assert len(rows) == 1 + len(folders)  # the header row and one per input: none forged
    assert html.count("<td>") == 5 * len(folders)
    assert "<img" not in html and "<!--" not in html
    for entry in outcome.report["inputs"]:
        assert entry["sha256"] in html  # the real digests are all shown
    assert all("\n" not in line for line in card.splitlines())


def test_a_hostile_base_model_name_stays_text(peft_adapters: list[Path], tmp_path: Path) -> None:
    adapter = tmp_path / "a"
    shutil.copytree(peft_adapters[0], adapter)
    edit_config(adapter, base_model_name_or_path="m`\n<!--\n| forged | row |")
    spec = MergeSpec.model_validate(
        {"adapters": [{"uri": str(adapter)}], "output": {"uri": str(tmp_path / "out")}}
    )
    outcome = run_merge(spec, [adapter], tmp_path / "out", device="cpu")
    card = (tmp_path / "out" / "README.md").read_text()
    front = card.removeprefix("---\n").partition("\n---\n")[0]
    # one line: the name is a JSON (YAML) string with its newlines escaped
    assert front.splitlines()[:2] == [
        "library_name: peft",
        'base_model: "m`\\n<!--\\n| forged | row |"',
    ]
    _, html = render(card)
    assert html.count("<tr>") == 2 and "forged" not in html.split("<table>")[1]
    assert outcome.report["inputs"][0]["sha256"] in html and "<!--" not in html
