"""README is the front door: one screen, and every file and folder it or docs/ names is there."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + [os.path.join("docs", name) for name in os.listdir(os.path.join(REPO, "docs"))
                         if name.endswith(".md")]


def test_readme_is_one_screen():
    with open(os.path.join(REPO, "README.md")) as f:
        assert len(f.read().splitlines()) <= 200


def test_every_file_the_docs_name_exists():
    for page in PAGES:
        with open(os.path.join(REPO, page)) as f:
            text = f.read()
        folder = os.path.dirname(os.path.join(REPO, page))
        for link in re.findall(r"\]\(([^)#]+)", text):  # [text](path) links
            if not link.startswith("http"):
                assert os.path.exists(os.path.join(folder, link)), f"{page} links to {link}"
        for name in re.findall(r"`((?:[\w-]+/)*[\w-]+\.(?:py|txt|md))`", text):  # `file.py` in code marks
            assert any(os.path.exists(os.path.join(REPO, where, name)) for where in ("", "machinery", "benchmarks",
                                                                                      "tests", "docs")), \
                f"{page} names {name}"
