"""README.md and docs/*.md: links that resolve, commands that name real modules, a short README.

Plain file reads, no JAX: every relative link and image points at a file of the repository
(and its #anchor at a heading of that file, by GitHub's rules), every `python -m jaxllm...` /
`python -m benchmarks...` names a module that `python -m` can run, every benchmarks/,
configs/ and launch/ file named exists, and the README stays a front door: at most
README_MAX_LINES lines, opening with the Quickstart whose two commands CI (.ci/run) and users
rely on.
"""

from __future__ import annotations

import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

README_MAX_LINES = 270
# The Quickstart's two commands, exactly (the first trains the default, the second is CI's).
QUICKSTART_COMMANDS = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
    "python -m jaxllm.main --workdir=runs/tiny",
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test,aot,eval]' && "
    "pytest -q -n 2 --dist loadfile",
)

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
PYTHON_M = re.compile(r"\bpython3?\s+-m\s+((?:jaxllm|benchmarks)(?:\.\w+)*)")
REPO_FILE = re.compile(
    r"(?<![\w/.-])((?:benchmarks|configs|launch)/[\w./-]*\w\.(?:py|sh|sbatch|yaml))")


def _name(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (``` or ~~~), fenced lines blanked."""
    out, fence = [], None
    for line in text.splitlines():
        stripped = line.lstrip()
        marker = stripped[:3]
        if fence is None and marker in ("```", "~~~"):
            fence = marker
            out.append("")
        elif fence is not None and stripped.startswith(fence):
            fence = None
            out.append("")
        else:
            out.append("" if fence else line)
    return out


def github_anchor(heading: str) -> str:
    """GitHub's id for a heading: lowercase, punctuation dropped but for '-' and '_',
    spaces to '-' (markdown links in the heading count by their text)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    found, seen = set(), {}
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_anchor(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def links(path: pathlib.Path) -> list[str]:
    """Every link and image target outside code (fenced blocks and inline code spans)."""
    prose = "\n".join(prose_lines(path.read_text(encoding="utf-8")))
    prose = INLINE_CODE.sub(lambda m: "code", prose)
    return LINK.findall(prose)


def broken_links(path: pathlib.Path) -> list[str]:
    problems = []
    for target in links(path):
        if SCHEME.match(target):
            continue  # http:, https:, mailto:, ...
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: {_name(dest)} has no heading #{anchor}")
    return problems


def module_exists(module: str) -> bool:
    """Whether `python -m module` finds it in the checkout: a.b.c is a/b/c.py or a package
    a/b/c/ with a __main__.py (a package without one cannot be run)."""
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()


def missing_modules(path: pathlib.Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return sorted({m for m in PYTHON_M.findall(text) if not module_exists(m)})


def repo_file_exists(name: str) -> bool:
    """A file the docs name: from the checkout's root; configs/NAME.py is the shipped config
    jaxllm/configs/NAME.py, as `--config=configs/NAME.py` finds it."""
    return (ROOT / name).is_file() or (name.startswith("configs/")
                                       and (ROOT / "jaxllm" / name).is_file())


def missing_files(path: pathlib.Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return sorted({f for f in REPO_FILE.findall(text) if not repo_file_exists(f)})


def test_docs_exist():
    names = {p.name for p in DOCS}
    assert {"README.md", "glossary.md", "configs.md", "speed.md"} <= names, names


@pytest.mark.parametrize("path", PAGES, ids=_name)
def test_relative_links_resolve(path):
    assert broken_links(path) == []


@pytest.mark.parametrize("path", PAGES, ids=_name)
def test_python_m_commands_name_real_modules(path):
    assert missing_modules(path) == []


@pytest.mark.parametrize("path", PAGES, ids=_name)
def test_named_repository_files_exist(path):
    assert missing_files(path) == []


def test_every_chapter_starts_with_a_title():
    for path in DOCS:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# "), (_name(path), first)


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines, at most {README_MAX_LINES}"


def test_readme_opens_with_the_quickstart():
    lines = README.read_text(encoding="utf-8").splitlines()
    prose = prose_lines("\n".join(lines))
    headings = [(i, line) for i, line in enumerate(prose) if HEADING.match(line)]
    assert headings[0][1] == "# jaxllm", headings[:2]
    start, first_section = headings[1]
    assert first_section == "## Quickstart", first_section
    end = next((i for i, line in headings[2:] if line.startswith("## ")), len(lines))
    section = lines[start:end]
    for command in QUICKSTART_COMMANDS:
        assert command in section, f"the Quickstart lost its command line: {command}"


def test_the_checks_catch_what_they_should(tmp_path, monkeypatch):
    """The link, anchor, module and file checks fail on a broken page."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "jaxllm").mkdir()
    (tmp_path / "jaxllm" / "real.py").write_text("")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# A page\n\n## Part two: `x.y`\n\n"
        "[ok](page.md#part-two-xy) [self](#a-page) [web](https://example.com/x)\n"
        "[gone](nothing.md) [bad anchor](page.md#no-such) ![img](images/none.png)\n"
        "`[not a link](inside-code.md)`\n\n"
        "```\n[not a link either](fenced.md)\npython -m jaxllm.fenced_missing\n```\n\n"
        "`python -m jaxllm.real` `python -m jaxllm.missing --flag` `benchmarks/gone.py`\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert [p.split(":")[0] for p in broken_links(page)] == [
        "nothing.md", "page.md#no-such", "images/none.png"]
    assert missing_modules(page) == ["jaxllm.fenced_missing", "jaxllm.missing"]
    assert missing_files(page) == ["benchmarks/gone.py"]
    assert github_anchor("Sharding, multi-host and `jaxllm.plan`") == (
        "sharding-multi-host-and-jaxllmplan")
