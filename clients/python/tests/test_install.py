"""The README's install line, for real and offline: a venv that sees
Debian's setuptools and wheel, then pip with no build isolation (an
isolated build would download its backend) and no index."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from conftest import CLIENT_DIR

PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def test_offline_install_in_a_venv(tmp_path):
    src = tmp_path / "src"
    # A copy: an in-tree build leaves build/ and *.egg-info behind.
    shutil.copytree(CLIENT_DIR, src, ignore=shutil.ignore_patterns("tests", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    venv = tmp_path / "venv"
    subprocess.run([PYTHON, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-build-isolation", str(src)], check=True, env=env)
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import boxq, boxq.environment, os; d = os.path.dirname(boxq.__file__); "
         "print(d); print(os.path.exists(os.path.join(d, 'py.typed'))); "
         "print(boxq.environment.BoxqEnvironment.__name__, boxq.Client.__name__)"],
        check=True, capture_output=True, text=True, env=env, cwd=str(tmp_path)).stdout.split("\n")
    assert out[0].startswith(str(venv)), out
    assert out[1] == "True", "py.typed is not installed"
    assert out[2] == "BoxqEnvironment Client"
