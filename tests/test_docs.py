"""The user documentation points only at things the repository has: every relative link (and its #anchor), every
repository path and Python name in its code, every Markdown file it names; and it tells no history."""

from __future__ import annotations

import glob
import importlib
import re
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]
IDS = [str(p.relative_to(REPO)) for p in DOCS]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
TOP = r"(?:\.ci|m3leo_stream|shard_tools|bench|slurm|scripts|tests|ci|docs)"
REPO_PATH = re.compile(r"(?<![\w./$-])(" + TOP + r"/[^\s`'\"()\[\],;|]*)")
PY_NAME = re.compile(r"(?<![\w./-])((?:m3leo_stream|shard_tools)(?:\.\w+)+)")
FROM_IMPORT = re.compile(r"^\s*from ((?:m3leo_stream|shard_tools)[\w.]*) import ([\w, ]+)$", re.M)
MD_NAME = re.compile(r"(?<![\w./-])([\w-]+\.md)\b")
HISTORY = re.compile(r"\b(now|previously|we changed|new in|no longer|used to)\b", re.I)


def split(text: str) -> tuple[str, list[str]]:
    """Prose (fenced blocks blanked out) and the code: fenced blocks and inline spans."""
    code = FENCE.findall(text)
    prose = FENCE.sub("", text)
    code += INLINE.findall(prose)
    return INLINE.sub("``", prose), code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    out: set[str] = set()
    for line in FENCE.sub("", md.read_text()).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            base = s = slug(m.group(1))
            n = 0
            while s in out:
                n += 1
                s = f"{base}-{n}"
            out.add(s)
    return out


def exists(path: str) -> bool:
    """A repository path, a glob of some, or a directory."""
    path = path.rstrip(".:")
    if "*" in path:
        return bool(glob.glob(str(REPO / path)))
    return (REPO / path).exists()


def resolves(dotted: str) -> bool:
    """``pkg.module.attr...`` names a module or an attribute of one."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # a module of ours that is not there: try the parent
                continue
            raise
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("md", DOCS, ids=IDS)
def test_relative_links_resolve(md: Path) -> None:
    prose, _ = split(md.read_text())
    bad = []
    for target in LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if REPO not in (dest, *dest.parents) or not dest.exists():
            bad.append(f"{target}: no such file in the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not bad, f"{md.relative_to(REPO)}: " + "; ".join(bad)


@pytest.mark.parametrize("md", DOCS, ids=IDS)
def test_repository_paths_exist(md: Path) -> None:
    _, code = split(md.read_text())
    named = {p for block in code for p in REPO_PATH.findall(block) if not re.search(r"[<>{}…$]", p)}
    missing = sorted(p for p in named if not exists(p))
    assert not missing, f"{md.relative_to(REPO)} names paths the repository lacks: {missing}"


def test_code_map_names_exist() -> None:
    """Every file and folder of the README's code map (indented names are inside the folder above them)."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"^## Code map\n.*?^```text\n(.*?)^```", text, re.S | re.M)
    assert block, "README.md has no code map"
    missing, top = [], ""
    for line in block.group(1).splitlines():
        names = re.split(r"\s{2,}", line.strip())[0]
        for name in (n.strip() for n in names.split(",")):
            path = name if not line.startswith(" ") else top + name
            if not exists(path):
                missing.append(path)
        if not line.startswith(" "):
            top = names.split(",")[0].strip()
    assert not missing, f"the code map names what the repository lacks: {missing}"


@pytest.mark.parametrize("md", DOCS, ids=IDS)
def test_python_names_resolve(md: Path) -> None:
    _, code = split(md.read_text())
    names: set[str] = set()
    for block in code:
        names.update(PY_NAME.findall(block))
        for module, imported in FROM_IMPORT.findall(block):
            names.update(f"{module}.{n.strip()}" for n in imported.split(",") if n.strip())
    unresolved = sorted(n for n in names if not resolves(n))
    assert not unresolved, f"{md.relative_to(REPO)} names modules or objects that do not exist: {unresolved}"


@pytest.mark.parametrize("md", DOCS, ids=IDS)
def test_markdown_files_named_exist(md: Path) -> None:
    """A bare ``NAME.md`` in the text is a file of the repository (none pointing outside it, such as a design note)."""
    have = {p.name for p in REPO.rglob("*.md") if ".venv" not in p.parts and ".git" not in p.parts}
    named = set(MD_NAME.findall(md.read_text()))
    assert not named - have, f"{md.relative_to(REPO)} names Markdown files the repository lacks: {sorted(named - have)}"


@pytest.mark.parametrize("md", DOCS, ids=IDS)
def test_no_history(md: Path) -> None:
    """Documentation says what is, not what changed."""
    prose, _ = split(md.read_text())
    hits = [line.strip()[:100] for line in prose.splitlines() if HISTORY.search(line)]
    assert not hits, f"{md.relative_to(REPO)}: history wording in {hits}"


def test_readme_keeps_the_two_commands() -> None:
    text = (REPO / "README.md").read_text()
    for command in ("bash scripts/demo.sh", "bash scripts/test.sh"):
        assert command in text
    assert text.index("bash scripts/demo.sh") < text.index("## A 5-minute tour")
