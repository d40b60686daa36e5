"""PEP 517/660 build backend: setuptools' own, built against the torch of the environment that runs pip.

pip builds in an isolated environment: the same interpreter (so `sys.prefix` and `site` still
describe the environment that runs pip), but with that environment's site-packages, and the paths
their .pth files add, taken off `sys.path`, and only the build requirements (setuptools, wheel,
ninja) put on it. Listing torch among the build requirements would make pip download some other
torch (GBs of CUDA wheels) and compile against it, not against the torch the extension will run
with. So before setup.py runs, this puts the invoking environment's site-packages back, at the
END of `sys.path`: the build requirements keep precedence, torch and what it imports come from
the user's environment. With --no-build-isolation torch is importable already and nothing
changes. Where torch still cannot be imported, setup.py stops with one line saying what to do.
"""

import importlib.util
import os
import site
import sys

from setuptools.build_meta import *  # noqa: F403  (every PEP 517/660 hook, unchanged)


def invoking_site_dirs() -> list[str]:
    """The site directories that `python` of the environment running pip starts with, in its order:
    a venv's own, then (where system packages are seen) the user's, then the system's."""
    dirs = site.getsitepackages()
    own = [d for d in dirs if sys.prefix != sys.base_prefix and d.startswith(os.path.join(sys.prefix, ""))]
    system = [d for d in dirs if d not in own]
    # pip sets PYTHONNOUSERSITE for the build; Python itself adds the user's site wherever it
    # adds the system's.
    user = [site.getusersitepackages()] if system else []
    return [d for d in own + user + system if os.path.isdir(d)]


def see_invoking_environment() -> None:
    if importlib.util.find_spec("torch") is not None:
        return
    for path in invoking_site_dirs():
        site.addsitedir(path)  # appends, and runs the directory's .pth files as startup does
    importlib.invalidate_caches()


see_invoking_environment()
