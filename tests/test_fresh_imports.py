"""Every public entry point imports in a fresh interpreter (an import cycle only shows when a module is imported
first, e.g. `python -c "import symerge; symerge.load('out')"`).

One driver process imports the heavy third-party libraries once, then forks one child per entry point: each child
starts with no `symerge` module loaded, so import order is exactly that of a fresh `python -c`.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import symerge

DRIVER = r"""
import json, os, sys
import torch, transformers, pydantic, safetensors  # noqa: F401 - shared by every child (speed only)
assert not [m for m in sys.modules if m == "symerge" or m.startswith("symerge.")]
def start(code):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            exec(code, {})
            os._exit(0)
        except BaseException as err:  # noqa: BLE001
            os.write(write, f"{type(err).__name__}: {err}".encode()[:4000])  # < a pipe buffer: never blocks
            os._exit(1)
    os.close(write)
    return pid, read

failures = {}
points = json.loads(sys.argv[1])
for first in range(0, len(points), 8):  # 8 children at a time
    running = [(name, *start(code)) for name, code in points[first:first + 8]]
    for name, pid, read in running:
        _, status = os.waitpid(pid, 0)
        message = os.read(read, 8192)
        os.close(read)
        if status != 0:
            failures[name] = message.decode(errors="replace") or f"exit status {status}"
print(json.dumps(failures))
"""


def entry_points() -> list[tuple[str, str]]:
    """(name, code) for every module under symerge plus the documented entry points."""
    root = Path(symerge.__file__).parent
    modules = ["symerge"] + [m.name for m in pkgutil.walk_packages([str(root)], prefix="symerge.")]
    points = [(m, f"import {m}") for m in modules if not m.endswith("__main__")]
    points += [
        ("symerge.load", "import symerge, tempfile\n"
                         "try:\n    symerge.load(tempfile.mkdtemp())\n"
                         "except symerge.ValidationError:\n    pass"),
        ("from symerge.result import MergeResult", "from symerge.result import MergeResult"),
        ("from symerge.export import load", "from symerge.export import load"),
        ("symerge.cli.main", "from symerge.cli import main\nimport contextlib, io\n"
                             "with contextlib.redirect_stdout(io.StringIO()):\n    assert main(['methods']) == 0"),
    ]
    return points


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the driver forks one child per entry point")
def test_every_entry_point_imports_in_a_fresh_interpreter():
    points = entry_points()
    assert len(points) > 40
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(points)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"{name}: {why}" for name, why in failures.items())


def test_the_cli_writes_each_log_line_at_once_into_a_file_or_pipe():
    """A bench's progress lines ("expert X: fine-tuned in 95s") must reach a redirected log as they happen, not when
    an 8-kB buffer fills minutes later."""
    import subprocess
    import sys

    code = ("import io, sys; from symerge.cli import main; main(['methods']); "
            "sys.stderr.write(str(sys.stdout.line_buffering))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stderr.strip().endswith("True")


def test_python_dash_m_symerge_runs_the_cli():
    """`python -m symerge` works like the `symerge` script (a checkout on PYTHONPATH has no script)."""
    done = subprocess.run([sys.executable, "-m", "symerge", "methods"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "symerge" in done.stdout and "task_arithmetic" in done.stdout
