"""The README and docs/ name only what exists: repository paths, links, make targets and `busseg`
flags. Renames and moves leave stale names behind that no other test notices (the README named a
`csrc/cuda` folder after it had gone). The README stays an entry page of at most 200 lines."""

import contextlib
import glob
import io
import os
import re
from importlib.metadata import entry_points

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
# A backquoted word whose first folder is one of these names a file of this repository (other paths
# are upstream's, or outputs under runs/). models/ and train/ are the root folders that moved into
# busseg_ops/: a path under them is stale.
REPO_FOLDERS = {"busseg_ops", "csrc", "tests", "benchmarks", "tools", "docs", "examples", "build_backend"}
FORMER_FOLDERS = {"models", "train"}
# Reports that a make target writes and that do not exist until it has run.
WRITTEN_BY_TARGETS = {"benchmarks/SEMISEG_CAW.md": "reproduce-semiseg-caw", "benchmarks/last_run.md": "bench"}
# The pages whose backquoted `--flags` are flags of the `busseg` command.
FLAG_PAGES = {"docs/training.md", "docs/presets.md"}
README_MAX_LINES = 200
FENCED = r"^ *```[^\n]*\n(.*?)^ *```"  # a code block, indented too (in a list item)


def read(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def code_spans(text):
    """The lines of fenced code blocks and the inline `code` spans."""
    blocks = re.findall(FENCED, text, re.S | re.M)
    prose = re.sub(FENCED, "", text, flags=re.S | re.M)
    inline = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]  # a span may wrap
    return [line for block in blocks for line in block.splitlines()] + inline


def repo_paths(text):
    for span in code_spans(text):
        for word in span.split():
            word = word.strip("'\"(),;").rstrip(".:),;")  # the sentence's punctuation after a path
            word = re.sub(r":\d+(-\d+)?$", "", word)  # file.py:12-20
            word = word.split("::")[0]  # tests/test_x.py::test_name
            first = word.split("/")[0]
            if "/" in word and (first in REPO_FOLDERS or first in FORMER_FOLDERS):
                yield word


def as_glob(path):
    """`csrc/<op>/cuda.cu`, `benchmarks/bench_{arp,cra}.py`, `tests/test_*.py`: placeholders match any name."""
    return re.sub(r"<[^>]*>|\{[^}]*\}", "*", path)


def links(text):
    prose = re.sub(FENCED, "", text, flags=re.S | re.M)
    return re.findall(r"\]\(([^)\s]+)\)", prose)


def slug(heading):
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page):
    return {slug(h) for h in re.findall(r"^#+ (.*)$", read(page), re.M)}


def make_targets():
    rules = re.findall(r"^([A-Za-z0-9_.-]+(?: +[A-Za-z0-9_.-]+)*) *:(?![=])", read("Makefile"), re.M)
    return {t for rule in rules for t in rule.split()}


@pytest.mark.parametrize("page", PAGES)
def test_every_repository_path_exists(page):
    missing = []
    for path in repo_paths(read(page)):
        if path.split("/")[0] in FORMER_FOLDERS:
            missing.append(f"{path} (moved under busseg_ops/)")
        elif path.rstrip("/") in WRITTEN_BY_TARGETS:
            assert WRITTEN_BY_TARGETS[path.rstrip("/")] in make_targets()
        elif not glob.glob(os.path.join(ROOT, as_glob(path))):
            missing.append(path)
    assert not missing, f"{page} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(read(page)):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(ROOT, linked)):
            broken.append(target)
        elif anchor and linked.endswith(".md") and anchor not in anchors(linked):
            broken.append(f"{target} (no such heading in {linked})")
    assert not broken, f"{page} has broken links: {broken}"


@pytest.mark.parametrize("page", PAGES)
def test_every_make_target_named_exists(page):
    named = {m for span in code_spans(read(page)) for m in re.findall(r"(?:^|[\s;&|(])make +([a-z][\w-]*)", span)}
    assert named - make_targets() == set(), f"{page} names make targets the Makefile lacks"


@pytest.fixture(scope="module")
def busseg_flags():
    """Every flag of every `busseg` subcommand, from their --help (the installed entry point)."""
    (busseg,) = entry_points(group="console_scripts", name="busseg")
    main = busseg.load()
    flags = set()
    for argv in ([], ["train"], ["eval"], ["predict"], ["compare"], ["export"]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            main([*argv, "--help"])
        flags |= set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", out.getvalue()))
    assert {"--method", "--preset", "--checkpoint", "--which"} <= flags  # the help was read
    return flags


@pytest.mark.parametrize("page", sorted(FLAG_PAGES))
def test_every_busseg_flag_named_exists(page, busseg_flags):
    named = set()
    for span in code_spans(read(page)):
        if re.match(r"(\.venv/bin/)?busseg\b|--", span.strip()):
            named |= set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", span))
    assert named, page
    assert named - busseg_flags == set(), f"{page} names flags busseg does not have"


def test_readme_is_an_entry_page():
    lines = read("README.md").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail to docs/"
    linked = {os.path.normpath(t.partition("#")[0]) for t in links(read("README.md"))}
    unlinked = [p for p in PAGES[1:] if p not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_the_checks_catch_what_they_look_for():
    text = "see `csrc/cuda/arp.cu`, `models/unet.py` and `make nothing`; [x](docs/none.md) `busseg_ops/ops/<op>.py`"
    assert list(repo_paths(text)) == ["csrc/cuda/arp.cu", "models/unet.py", "busseg_ops/ops/<op>.py"]
    assert glob.glob(os.path.join(ROOT, as_glob("busseg_ops/ops/<op>.py")))
    assert not glob.glob(os.path.join(ROOT, as_glob("csrc/cuda/arp.cu")))
    assert links(text) == ["docs/none.md"]
    assert re.findall(r"(?:^|[\s;&|(])make +([a-z][\w-]*)", code_spans(text)[-2]) == ["nothing"]
    assert {"test", "demo", "gpu-check"} <= make_targets() and "VENV" not in make_targets()
    assert slug("Config files and upstream's layout") == "config-files-and-upstreams-layout"


def test_readme_example_runs():
    readme = read("README.md")
    code = re.search(r"```python\n(.*?)```", readme[readme.index("## Drop-in use") :], re.S).group(1)
    scope = {}
    exec(code, scope)  # as a reader would paste it
    assert scope["feat"].grad is not None and scope["same"].shape == scope["out"].shape
