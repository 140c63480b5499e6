"""The docs name code that exists: every `path.py:name` reference in README.md, weights.md and the pages under docs/
names a definition in that file, every relative markdown link reaches a file, every repository path a page puts in
backticks is there, and the README's layout names every module and no file that is gone.

A code reference is ``PATH.py:NAME`` or ``PATH.py:NAME.ATTR[.ATTR...]``, anywhere in a page (backticks or not; in a
.py page, its docstrings, strings and comments).

Path rule: a path whose first folder is a top-level folder of the repository (``diffedit/``, ``scripts/``,
``tests/``, ``docs/``) is relative to the repository root; any other path is relative to the package folder
``diffedit/``. So ``masking.py`` is diffedit/masking.py, ``sweep/grid.py`` is diffedit/sweep/grid.py,
``toy/judge.py`` is diffedit/toy/judge.py, and ``tests/measure.py`` is the test helper at the root.

Name rule: NAME is defined at the top level of the file (def, class, assignment or annotated assignment, also inside
a top-level ``if`` / ``try`` / ``with``), not merely imported; each further ATTR is defined in the body of the class
named before it: a method or property, a class attribute, a dataclass field, a nested class, or an attribute its
methods assign to ``self``. Files are parsed with ``ast``, never imported: the check runs no project code.
"""
from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_FOLDERS = ("diffedit", "scripts", "tests", "docs")

REFERENCE = re.compile(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.py):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(rf"^(?:{'|'.join(TOP_FOLDERS)})/[\w./-]*$")


def doc_pages() -> list[Path]:
    """README.md, weights.md and every .md / .py under docs/."""
    pages = [ROOT / "README.md", ROOT / "weights.md"]
    pages += sorted(p for p in (ROOT / "docs").rglob("*") if p.suffix in (".md", ".py") and p.is_file())
    return pages


def page_id(page: Path) -> str:
    """A page's name in reports: its path in the repository (a page elsewhere, as a test's, by its own path)."""
    return page.relative_to(ROOT).as_posix() if page.is_relative_to(ROOT) else str(page)


# --- extraction ---------------------------------------------------------------------------------------------------

def references(text: str) -> list[tuple[int, str, str]]:
    """(line, path, dotted name) of every code reference in a page's text."""
    return [(n, m.group(1), m.group(2))
            for n, line in enumerate(text.splitlines(), 1) for m in REFERENCE.finditer(line)]


def _outside_fences(text: str):
    """(line number, line) of the lines outside fenced code blocks (a link-like pattern in code is code)."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield n, line


def links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every relative markdown link (web addresses and in-page anchors left out)."""
    out = []
    for n, line in _outside_fences(text):
        for m in LINK.finditer(line):
            target = m.group(1)
            if not re.match(r"^(?:[a-z]+:|#)", target):
                out.append((n, target.split("#")[0]))
    return out


def repo_paths(text: str) -> list[tuple[int, str]]:
    """(line, path) of every backticked path into a top-level folder (``docs/results/x.json``), without any
    ``:name`` part."""
    out = []
    for n, line in _outside_fences(text):
        for m in CODE_SPAN.finditer(line):
            span = m.group(1).split(":")[0].strip()
            if REPO_PATH.match(span) and not any(c in span for c in "*?"):
                out.append((n, span))
    return out


# --- resolution ---------------------------------------------------------------------------------------------------

def resolve(path: str) -> Path:
    """The file a reference's path names, by the path rule of this module's docstring."""
    if path.split("/")[0] in TOP_FOLDERS:
        return ROOT / path
    return ROOT / "diffedit" / path


@lru_cache(maxsize=None)
def _module(file: Path) -> ast.Module:
    return ast.parse(file.read_text(encoding="utf-8"), filename=str(file))


def _statements(body):
    """The statements of a body, looking inside if / try / with blocks (definitions guarded by them count)."""
    for node in body:
        if isinstance(node, ast.If):
            yield from _statements(node.body)
            yield from _statements(node.orelse)
        elif isinstance(node, ast.Try):
            for part in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _statements(part)
        elif isinstance(node, ast.With):
            yield from _statements(node.body)
        else:
            yield node


def _targets(target):
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, (ast.Tuple, ast.List)):
        for t in target.elts:
            yield from _targets(t)


def _defined(body, name: str):
    """The node that defines ``name`` in a module's or class's body (a def, a class, an assignment), else None."""
    for node in _statements(body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return node
        if isinstance(node, ast.Assign) and any(name in _targets(t) for t in node.targets):
            return node
        if isinstance(node, ast.AnnAssign) and name in _targets(node.target):
            return node
    return None


def _self_attributes(cls: ast.ClassDef) -> set[str]:
    """Attributes the class's methods assign to ``self``."""
    names = set()
    for method in cls.body:
        if isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(method):
                if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                        and isinstance(node.value, ast.Name) and node.value.id == "self"):
                    names.add(node.attr)
    return names


def problem(path: str, name: str) -> str | None:
    """Why ``path:name`` does not resolve (None: it does)."""
    file = resolve(path)
    if not file.is_file():
        return f"no file {file.relative_to(ROOT).as_posix()}"
    parts = name.split(".")
    node = _defined(_module(file).body, parts[0])
    if node is None:
        return f"{parts[0]} is not defined at the top level of {file.relative_to(ROOT).as_posix()}"
    for i, attr in enumerate(parts[1:], 1):
        owner = ".".join(parts[:i])
        if not isinstance(node, ast.ClassDef):
            return f"{owner} is not a class, so it has no {attr}"
        found = _defined(node.body, attr)
        if found is None and attr not in _self_attributes(node):
            return f"class {owner} defines no {attr}"
        node = found
    return None


def unresolved(page: Path) -> list[str]:
    """'page:line: path:name (why)' for each reference of the page that does not resolve."""
    text = page.read_text(encoding="utf-8")
    return [f"{page_id(page)}:{n}: {path}:{name} ({why})"
            for n, path, name in references(text) if (why := problem(path, name))]


def broken_links(page: Path) -> list[str]:
    """'page:line: target' for each relative link of a markdown page whose file or folder is missing."""
    if page.suffix != ".md":
        return []
    return [f"{page_id(page)}:{n}: {target}" for n, target in links(page.read_text(encoding="utf-8"))
            if not (page.parent / target).exists()]


def missing_paths(page: Path) -> list[str]:
    """'page:line: path' for each backticked repository path that is not there."""
    return [f"{page_id(page)}:{n}: {path}" for n, path in repo_paths(page.read_text(encoding="utf-8"))
            if not (ROOT / path).exists()]


# --- the checks ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("page", doc_pages(), ids=page_id)
def test_every_code_reference_names_a_definition_in_its_file(page):
    assert not unresolved(page), "\n".join(unresolved(page))


@pytest.mark.parametrize("page", doc_pages(), ids=page_id)
def test_every_relative_markdown_link_reaches_a_file(page):
    assert not broken_links(page), "\n".join(broken_links(page))


@pytest.mark.parametrize("page", doc_pages(), ids=page_id)
def test_every_backticked_repository_path_exists(page):
    assert not missing_paths(page), "\n".join(missing_paths(page))


def _layout() -> str:
    """The README's layout block: the fenced block under "## Layout"."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("## Layout", 1)[1].split("```", 2)[1]


def test_the_readme_layout_names_every_module_and_only_files_that_exist():
    layout = _layout()
    folders = ["diffedit", "diffedit/sweep", "diffedit/models", "diffedit/checkpoint", "diffedit/toy", "scripts"]
    modules = [p for f in folders for p in sorted((ROOT / f).glob("*.py")) if not p.name.startswith("__")]
    # a module is named by its file name, its stem (the sub-packages' lists), or a glob such as app*.py
    globs = re.findall(r"[\w]*\*[\w]*\.py", layout)
    unnamed = [p.relative_to(ROOT).as_posix() for p in modules
               if not re.search(rf"(?<![\w.]){re.escape(p.stem)}(?![\w])", layout)
               and not any(p.match(g) for g in globs)]
    assert not unnamed, f"README layout does not name {unnamed}"
    named = set(re.findall(r"(?<![\w*/])(\w+\.py)\b", layout))
    present = {p.name for p in ROOT.glob("**/*.py")}
    assert named <= present, f"README layout names files that do not exist: {sorted(named - present)}"


# --- the checks can fail ------------------------------------------------------------------------------------------

def test_the_extraction_finds_the_references_the_pages_make():
    def count(name):
        return len(references((ROOT / name).read_text(encoding="utf-8")))
    assert count("docs/paper-map.md") >= 60  # the paper map is a table of them
    assert count("README.md") >= 5
    found = {(p, n) for _, p, n in references((ROOT / "docs/paper-map.md").read_text(encoding="utf-8"))}
    assert ("diffedit/masking.py", "binarize") in found
    assert any("." in name for _, name in found)  # Class.method references are read whole
    assert len(links((ROOT / "README.md").read_text(encoding="utf-8"))) >= 3


def test_a_made_up_reference_is_reported_with_its_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "Real: `diffedit/masking.py:binarize`, `masking.py:normalize`, `sweep/grid.py:edit_grid`,",
        "`denoiser.py:Denoiser.step` (a method), `settings.py:Recipe.blend_late` (a dataclass field),",
        "`model_call.py:Rows.calls` (assigned to self), `tests/measure.py` and `settings.py:RECIPES` (an assignment).",
        "Made up: `diffedit/masking.py:no_such_function`,",
        "`settings.py:Recipe.no_such_field`, `nowhere.py:anything`, `masking.py:Denoiser` (imported, not defined),",
        "`masking.py:binarize.threshold` (a function has no attributes). Not references: http://host:8080/x,",
        "`file.py:12` (a line number).",
    ]), encoding="utf-8")
    report = [line.split(": ", 1)[1] for line in unresolved(page)]
    assert [r.split(" (")[0] for r in report] == [
        "diffedit/masking.py:no_such_function", "settings.py:Recipe.no_such_field", "nowhere.py:anything",
        "masking.py:Denoiser", "masking.py:binarize.threshold"], report
    lines = [int(line.split(":")[1]) for line in unresolved(page)]
    assert lines == [4, 5, 5, 5, 6]


def test_the_path_rule():
    assert resolve("diffedit/masking.py") == resolve("masking.py") == ROOT / "diffedit" / "masking.py"
    assert resolve("sweep/grid.py") == ROOT / "diffedit" / "sweep" / "grid.py"
    assert resolve("tests/measure.py") == ROOT / "tests" / "measure.py"
    assert resolve("scripts/benchmark.py") == ROOT / "scripts" / "benchmark.py"


def test_a_broken_link_and_a_missing_path_are_reported(tmp_path):
    (tmp_path / "there.json").write_text("{}")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.json) [web](https://example.org/x.md) [anchor](#top)\n"
                    "[broken](results/missing.json#part) `docs/results/no_such_file.json` `docs/paper-map.md`\n"
                    "```\nx = y[0](z)\n```\n", encoding="utf-8")
    assert [line.split(": ", 1)[1] for line in broken_links(page)] == ["results/missing.json"]
    assert [line.split(": ", 1)[1] for line in missing_paths(page)] == ["docs/results/no_such_file.json"]
