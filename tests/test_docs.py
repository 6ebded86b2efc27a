"""README.md and docs/: the front door stays one screen, and every file and name they give exists where they say."""
import os
import re

import torch
import torch.nn.functional as F

from conftest import REPO

PAGES = ["README.md"] + [os.path.join("docs", name) for name in sorted(os.listdir(os.path.join(REPO, "docs")))
                         if name.endswith(".md")]
ONEDNN_KERNELS = {"brg_conv_fwd", "brg_conv_bwd"}  # what docs/speed.md saw oneDNN run, not names of this project
README_LINES = 200  # one screen, as the front door of a repo of this kind


def text_of(page):
    with open(os.path.join(REPO, page), encoding="utf-8") as f:
        return f.read()


def code():
    """The text of every Python file of the project, tests and benchmarks included."""
    texts = []
    for folder, _, names in os.walk(REPO):
        if not {".venv", ".git", "data", "outputs"} & set(folder[len(REPO):].split(os.sep)):
            texts += [text_of(os.path.join(folder, name)) for name in names if name.endswith(".py")]
    return "\n".join(texts)


def test_readme_is_one_screen_and_links_every_docs_page():
    readme = text_of("README.md")
    assert len(readme.splitlines()) <= README_LINES
    for page in PAGES[1:]:
        assert f"({page}" in readme, f"README.md does not link {page}"


def test_every_file_the_pages_name_exists():
    for page in PAGES:
        folder = os.path.dirname(page)
        for name in re.findall(r"`([\w./-]+\.(?:py|png|md|txt|json|csv|pt))`", text_of(page)):
            candidates = [os.path.join(REPO, place, name) for place in ("", folder, "tests", "benchmarks")]
            run_file = "/" not in name and name.endswith((".json", ".csv", ".pt", ".png"))  # a run's own files
            data_file = name.startswith(("MNIST/", "data/", "outputs/"))  # where runs and data go, not the repo
            assert run_file or data_file or any(os.path.exists(path) for path in candidates), f"{page} names {name}"
        for link in re.findall(r"\]\(([^)#\s]+)", text_of(page)):
            if not link.startswith("http"):
                assert os.path.exists(os.path.join(REPO, folder, link)), f"{page} links {link}"


def test_every_function_and_constant_the_pages_name_is_in_the_code():
    source = code()
    for page in PAGES:
        for name in set(re.findall(r"`(?:[\w/]+\.py[ :]+)?([A-Za-z_][A-Za-z0-9_]*)(?:\(\))?`", text_of(page))):
            if "_" in name.strip("_") or name.startswith("_"):  # a name of the code's, not a word
                in_torch = (hasattr(torch, name) or hasattr(F, name) or hasattr(torch.ops.aten, name)  # (profiles)
                            or name in ONEDNN_KERNELS)
                assert in_torch or re.search(rf"\b{re.escape(name)}\b", source), f"{page} names {name}, which " \
                                                                                    f"the code does not"
