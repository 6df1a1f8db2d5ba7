"""Every ```python block of README.md and docs/**/*.md runs as written, on the CPU.

The blocks of one page run top to bottom, each in a fresh namespace (so a block that uses a name it does not define
or import fails), all in one temporary working directory per page (so a block may read files an earlier block of
the page wrote).

A block whose first line is `# needs: <what>` reads something the user makes or fetches first. It runs when the
first word of <what> is a path that exists in the page's directory: written by an earlier block, or by one of the
stand-ins below (a tiny random pipeline in place of the demo's). Otherwise it is skipped with <what> as the reason.
`# needs: cuda ...` blocks run only where a CUDA device is present.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from pipeline_helpers import tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```", re.S | re.M)
NEEDS = re.compile(r"#\s*needs:\s*(.+)")


def python_blocks(page: Path) -> list[tuple[int, str]]:
    text = page.read_text()
    return [(text[:m.start()].count("\n") + 2, m.group(1)) for m in BLOCK.finditer(text)]


def needs_of(code: str) -> str:
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    m = NEEDS.match(first)
    return m.group(1).strip() if m else ""


# stand-ins for what a user makes first: an untrained tiny pipeline in place of the demo's
STAND_INS = {"artifacts/demo/pipeline": tiny_pipeline}


def cases():
    out = []
    for page in PAGES:
        for line, code in python_blocks(page):
            name = f"{page.relative_to(ROOT)}:{line}"
            out.append(pytest.param(page, line, code, id=name))
    return out


@pytest.fixture(scope="module")
def page_dirs(tmp_path_factory):
    dirs: dict[Path, Path] = {}

    def get(page: Path) -> Path:
        if page not in dirs:
            dirs[page] = tmp_path_factory.mktemp(page.stem)
        return dirs[page]
    return get


def test_every_page_is_found():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/model.md", "docs/training.md", "docs/data.md", "docs/design.md"} <= names
    assert sum(len(python_blocks(p)) for p in PAGES) >= 10


@pytest.mark.parametrize("page, line, code", cases())
def test_doc_snippet_runs(page, line, code, page_dirs, monkeypatch):
    workdir = page_dirs(page)
    monkeypatch.chdir(workdir)
    need = needs_of(code)
    if need:
        if need.split()[0].lower() == "cuda":
            if not torch.cuda.is_available():
                pytest.skip(f"needs: {need}")
        else:
            path = need.split()[0]
            if not os.path.exists(path) and path in STAND_INS:
                STAND_INS[path](path)
            if not os.path.exists(path):
                pytest.skip(f"needs: {need}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny sizes: one thread is fastest, and much faster on a busy machine
    try:
        exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), {"__name__": "__doc_snippet__"})
    finally:
        torch.set_num_threads(threads)
