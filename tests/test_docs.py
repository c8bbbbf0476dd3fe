"""The docs name only what exists: icl-sam2 subcommands, scripts, bundle configs, local links; the README stays short.

The commands themselves run in the tests of each part (``tests/cli``, ``tests/app/test_readme_command.py``,
``tests/bundle``); this catches a page that names a command, file or page that was renamed or removed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from icl_sam2.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    ROOT / "README.md",
    ROOT / "monailabel_app" / "README.md",
    ROOT / "bundle" / "docs" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]


def _text(page: Path) -> str:
    return page.read_text()


def test_the_readme_is_at_most_200_lines():
    assert len(_text(ROOT / "README.md").splitlines()) <= 200


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_file_and_link_a_page_names_exists(page):
    text = _text(page)
    for sub, rest in re.findall(r"icl-sam2 ([a-z][a-z-]*)((?: [a-z]+)?)", text):
        assert sub in COMMANDS, f"{page.name} names `icl-sam2 {sub}`, which is not a command ({sorted(COMMANDS)})"
        nested = COMMANDS[sub]
        if isinstance(nested, dict) and rest.strip() and not rest.strip().startswith(("export|", "infer|")):
            assert rest.strip() in nested, f"{page.name} names `icl-sam2 {sub}{rest}`; it has {sorted(nested)}"
    for path in re.findall(
        r"(?<![\w/])((?:scripts|bundle/configs|tests|model_core|monailabel_app|docs)/[\w./-]+\.(?:py|sh|json|md|png))",
        text,
    ):
        assert (ROOT / path).exists(), f"{page.name} names {path}, which does not exist"
    for target in re.findall(r"\]\(([^)#:]+)\)", text):  # local markdown links
        assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"
