"""The docs name what is there: the README's Layout lists every module, and the paths the docs mention exist."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

# Folders whose every module the Layout lists by name; tests/helpers/ is listed as a folder.
LISTED_FOLDERS = ("common", "data_prep", "pipeline", "bench")
LISTED_AS_FOLDER = "tests/helpers/"
# Paths inside the repository, as the docs write them: `pipeline/data.py`, `ds_configs/cpu-zero2-bf16-lamb.json`
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:common|data_prep|pipeline|bench|tests|slurm|ds_configs|docs)/[\w./-]*\w\.(?:py|sh|json|md|sbatch))"
)


def layout_block() -> str:
    """The code block under the README's "## Layout" heading."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"^## Layout\n.*?^```\n(.*?)^```", text, flags=re.M | re.S)
    assert match, "README.md: no code block under a '## Layout' heading"
    return match.group(1)


def layout_sections(block: str) -> dict[str, set[str]]:
    """Folder (a line's first word ending in "/") -> the words of its lines (that one and the indented ones after)."""
    sections: dict[str, set[str]] = {}
    folder = None
    for line in block.splitlines():
        if line[:1].strip():
            folder = line.split()[0]
            sections.setdefault(folder, set())
        if folder is not None:
            sections[folder].update(line.split())
    return sections


def test_layout_sections_are_read():
    sections = layout_sections(layout_block())
    assert {f"{folder}/" for folder in LISTED_FOLDERS} | {"tests/"} <= sections.keys()
    assert "model.py" in sections["pipeline/"] and "model.py" not in sections["data_prep/"]


@pytest.mark.parametrize("folder", LISTED_FOLDERS)
def test_layout_lists_every_module(folder):
    listed = layout_sections(layout_block())[f"{folder}/"]
    modules = sorted(
        str(path.relative_to(REPO / folder))
        for path in (REPO / folder).rglob("*.py")
        if path.name != "__init__.py" and "__pycache__" not in path.parts
    )
    missing = [module for module in modules if module not in listed]
    assert not missing, (
        f"README.md's Layout does not list {', '.join(f'{folder}/{m}' for m in missing)}: add each to the "
        f"'{folder}/' lines with a few words on what it holds"
    )


def test_layout_lists_the_test_helpers_folder():
    assert (REPO / LISTED_AS_FOLDER).is_dir()
    assert "helpers/" in layout_sections(layout_block())["tests/"], (
        f"README.md's Layout does not list {LISTED_AS_FOLDER}"
    )


def test_paths_the_docs_mention_exist():
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    stale = sorted(
        f"{doc.relative_to(REPO)}: {path}"
        for doc in docs
        for path in set(REPO_PATH.findall(doc.read_text()))
        if not (REPO / path).exists()
    )
    assert not stale, "the docs mention files that do not exist:\n" + "\n".join(stale)
