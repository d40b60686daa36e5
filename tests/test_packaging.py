"""Installing as a user types it, from a fresh `git clone` of this checkout's HEAD (uncommitted
changes are not in the clone, so commit before trusting these tests), into scratch virtual
environments that see the torch installed here and download no torch. The clone and the user's
environment are shared by the module's tests, so the extension compiles once and the other installs
only link (docs/testing.md)."""

import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TORCH_REQUIREMENT = "torch=={}.{}.*".format(*torch.__version__.split(".")[:2])
# What pip prints when it fetches or installs a distribution; a torch among them is a download.
FETCHED_TORCH = re.compile(
    r"^\s*(Collecting|Downloading|Processing|Using cached|Obtaining)\s+\S*\btorch\b"
    r"|^\s*Installing collected packages:.*\btorch\b",
    re.IGNORECASE | re.MULTILINE,
)
# Runs one op through the compiled kernels against the reference and prints where busseg_ops is.
RUN_ONE_OP = textwrap.dedent(
    """
    import torch, busseg_ops
    feat, logits = torch.randn(2, 5, 9, 7, dtype=torch.float64), torch.randn(2, 3, 9, 7, dtype=torch.float64)
    with busseg_ops.use_backend("cpu"):
        out = busseg_ops.adjacent_relation_propagation(feat, logits, kernel_size=3)
    with busseg_ops.use_backend("reference"):
        ref = busseg_ops.adjacent_relation_propagation(feat, logits, kernel_size=3)
    torch.testing.assert_close(out, ref)
    print(busseg_ops._C.__file__)
    """
)


def run(cmd: list, log: Path | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_NO_BUILD_ISOLATION", "PYTHONPATH")}
    env.setdefault("MAX_JOBS", "2")
    # Unoptimised objects: these tests check installing, not the kernels' speed (the suite's other
    # tests run the -O3 build), and -O0 compiles in a fifth of the time.
    env.setdefault("BUSSEG_OPT", "0")
    env.update(kw.pop("env", {}))
    r = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, **kw)
    if log is not None:
        log.write_text(r.stdout + r.stderr)
    if check and r.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{(r.stdout + r.stderr)[-6000:]}")
    return r


def assert_no_torch_fetched(log: str) -> None:
    fetched = [m.group(0).strip() for m in FETCHED_TORCH.finditer(log)]
    assert not fetched, f"pip fetched torch: {fetched}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("packaging")


@pytest.fixture(scope="module")
def clone(scratch) -> Path:
    """A fresh clone of HEAD."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    head = run(["git", "-C", ROOT, "rev-parse", "HEAD"]).stdout.strip()
    dst = scratch / "clone"
    run(["git", "clone", "--quiet", "--no-checkout", ROOT, dst])
    run(["git", "-C", dst, "checkout", "--quiet", "--detach", head])
    return dst


@pytest.fixture(scope="module")
def installed_packages(scratch) -> Path:
    """Links to the packages of this environment (torch, numpy, setuptools, ...), less busseg_ops."""
    links = scratch / "installed"
    links.mkdir()
    for site_dir in site.getsitepackages():
        for entry in Path(site_dir).iterdir():
            own = entry.name.lower().startswith(("busseg", "__editable__"))
            if not own and not (links / entry.name).exists():
                (links / entry.name).symlink_to(entry)
    return links


def make_venv(path: Path, sees: Path | None) -> Path:
    """A virtual environment; with `sees`, it also imports the packages linked there (torch)."""
    run([sys.executable, "-m", "venv", path])
    python = path / "bin" / "python"
    if sees is not None:
        # Python 3.11's venv brings an old setuptools, which would shadow torch's (torch needs a newer
        # one, and pip would fetch it): a user's environment with torch has a recent one.
        run([python, "-m", "pip", "uninstall", "-q", "-y", "setuptools"])
        purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
        Path(purelib, "installed_torch.pth").write_text(f"{sees}\n")
    return python


@pytest.fixture(scope="module")
def user_env(scratch, installed_packages) -> Path:
    """The environment a user runs pip from: torch installed, busseg_ops not."""
    return make_venv(scratch / "user-env", installed_packages)


def test_plain_editable_install_builds_against_the_installed_torch(clone, user_env, scratch):
    log = scratch / "pip-install-e.log"
    run([user_env, "-m", "pip", "install", "-v", "-e", clone], log=log, cwd=scratch)
    text = log.read_text()
    assert_no_torch_fetched(text)
    assert f"Requirement already satisfied: {TORCH_REQUIREMENT} in" in text  # the installed torch, kept
    so = run([user_env, "-c", RUN_ONE_OP], cwd=scratch).stdout.strip()
    assert Path(so).parent == clone / "busseg_ops"  # editable: the extension sits in the clone
    run([user_env.parent / "busseg", "--help"], cwd=scratch)


def test_plain_install_builds_against_the_installed_torch(clone, user_env, scratch):
    log = scratch / "pip-install.log"
    run([user_env, "-m", "pip", "install", "-v", clone], log=log, cwd=scratch)
    text = log.read_text()
    assert_no_torch_fetched(text)
    assert f"Requirement already satisfied: {TORCH_REQUIREMENT} in" in text
    so = Path(run([user_env, "-c", RUN_ONE_OP], cwd=scratch).stdout.strip())
    assert clone not in so.parents and user_env.parents[1] in so.parents  # a copy in the environment


def test_wheel_without_build_isolation_installs_into_another_environment(clone, user_env, installed_packages, scratch):
    wheels = scratch / "wheels"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    build = [user_env, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "-w", wheels, clone]
    run(build, log=scratch / "pip-wheel.log", cwd=scratch, env={"PATH": path})
    (wheel,) = wheels.glob("busseg_ops-*.whl")

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = re.findall(r"^Requires-Dist: (.*)$", zf.read(metadata).decode(), re.MULTILINE)
    # Every tracked file of the package folder (code and any package data) and the compiled
    # extension; nothing else.
    tracked = run(["git", "-C", clone, "ls-files", "busseg_ops/"]).stdout.split()
    expected = {name for name in tracked if not Path(name).name.startswith(".")}
    expected.add("busseg_ops/_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    assert {n for n in names if ".dist-info/" not in n} == expected
    assert [r for r in requires if re.match(r"torch\b", r)] == [TORCH_REQUIREMENT]

    other_env = make_venv(scratch / "other-env", installed_packages)
    log = scratch / "pip-install-wheel.log"
    run([other_env, "-m", "pip", "install", "-v", wheel], log=log, cwd=scratch)
    assert_no_torch_fetched(log.read_text())
    so = Path(run([other_env, "-c", RUN_ONE_OP], cwd=scratch).stdout.strip())
    assert (scratch / "other-env") in so.parents
    run([other_env.parent / "busseg", "--help"], cwd=scratch)


def test_build_without_torch_stops_with_one_line(clone, scratch):
    no_torch = make_venv(scratch / "no-torch-env", sees=None)
    log = scratch / "pip-install-no-torch.log"
    r = run([no_torch, "-m", "pip", "install", "-e", clone], log=log, check=False, cwd=scratch)
    text = log.read_text()
    assert r.returncode != 0
    assert_no_torch_fetched(text)
    ours = [line.strip() for line in text.splitlines() if "busseg_ops:" in line]
    assert len(ours) == 1 and "[1 lines of output]" in text, text
    assert "cannot import it" in ours[0] and "pip install torch" in ours[0]
    assert "pip install --no-build-isolation -e ." in ours[0]


def test_a_bad_optimization_level_stops_the_build_with_one_line(clone, scratch):
    r = run([sys.executable, "setup.py", "build_ext"], check=False, cwd=clone, env={"BUSSEG_OPT": "fast"})
    assert r.returncode != 0
    assert r.stderr.strip() == "busseg_ops: BUSSEG_OPT must be 0, 1, 2 or 3, not 'fast'", r.stderr
