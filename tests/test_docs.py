"""The README and the documentation site hold together: links resolve, every page is in the site's
navigation, every Python example parses, and the quick start runs as written. (The site itself is
built with warnings as errors by `make docs`, which CI runs; its anchors are checked there.)"""
import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("path", [ROOT / "README.md"] + PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(path):
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file = target.split("#")[0]
        assert (path.parent / file).exists(), f"{path.name} links to {target}, which does not exist"


def test_every_page_is_in_the_navigation():
    nav = re.findall(r":\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
    assert sorted(nav) == sorted(p.name for p in PAGES)
    assert len(nav) == len(set(nav))


@pytest.mark.parametrize("path", [ROOT / "README.md"] + PAGES, ids=lambda p: p.name)
def test_python_examples_parse(path):
    for block in python_blocks(path):
        compile(block, str(path), "exec")


def test_the_quick_start_runs(one_thread):
    first = python_blocks(DOCS / "quickstart.md")[0]
    namespace = {}
    exec(compile(first, "quickstart.md", "exec"), namespace)
    assert torch.isfinite(namespace["model"](namespace["x"])).all()
    model = namespace["model"]
    namespace["nn"].init.zeros_(model[0].bias)
    exec(compile(python_blocks(DOCS / "quickstart.md")[1], "quickstart.md", "exec"), namespace)
    assert [g["p_bound"] for g in namespace["opt"].param_groups] == [1.0, None]
