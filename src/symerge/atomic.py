"""Atomic writes: outputs appear complete or not at all (temp path beside the target, then rename).

Also the one rule for every command that writes a directory (`merge`, `convert`, `bench`): an existing output is
only replaced when it is empty or carries one of our manifests, its parent must be writable (checked up front),
and temp dirs a killed run left beside it (our own naming only) are removed on the next run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from symerge.errors import ValidationError

log = logging.getLogger("symerge")
TEMP_TAG = "symerge"  # temp dirs beside an output: .<name>.symerge-<tmp|old|probe>-<host hash>-<pid>-<random>


# --- permissions -----------------------------------------------------------------------------------------------------
def current_umask() -> int:
    """The process umask (from /proc on Linux: reading it with os.umask would briefly change it for all threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_modes(root: Path) -> None:
    """Give `root` (a file or a whole tree) the modes a plain write would: mkstemp / mkdtemp / safetensors make
    private 0600 / 0700 files, which other users of a shared model directory could not read."""
    mask = current_umask()
    root = Path(root)
    paths = [root, *root.rglob("*")] if root.is_dir() and not root.is_symlink() else [root]
    for path in paths:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o777 & ~mask)
        else:
            executable = path.stat().st_mode & 0o111
            path.chmod((0o777 if executable else 0o666) & ~mask)


# --- our temp dirs -----------------------------------------------------------------------------------------------
def host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_pattern(final: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(final.name)}\.{TEMP_TAG}-(tmp|old|probe)-([0-9a-f]{{8}})-(\d+)-[A-Za-z0-9_]+$")


def make_temp_dir(final: Path, kind: str = "tmp") -> Path:
    """A dir beside `final` named so that a later run can tell it is ours and whether its writer still runs."""
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.{TEMP_TAG}-{kind}-{host_tag()}-{os.getpid()}-",
                                 dir=final.parent))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temp_dirs(final: Path) -> list[Path]:
    """Our temp dirs beside `final` whose writer (same host, pid) is gone: left by a killed run."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    pattern, host = temp_pattern(final), host_tag()
    stale = []
    for entry in sorted(final.parent.iterdir()):
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and match.group(2) == host \
                and int(match.group(3)) != os.getpid() and not pid_alive(int(match.group(3))):
            stale.append(entry)
    return stale


def clean_stale_temp_dirs(final: Path) -> list[Path]:
    """Remove the temp dirs an interrupted (e.g. `kill -9`) write of `final` left behind, and say so."""
    removed = []
    for path in stale_temp_dirs(final):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            log.warning("symerge: removed stale temp dir '%s' left by an interrupted write of '%s'", path, final)
            removed.append(path)
    return removed


# --- output directories ----------------------------------------------------------------------------------------------
def is_replaceable(final: Path, manifests: Sequence[str]) -> bool:
    """An empty dir, or one that holds one of `manifests` (a previous output of ours)."""
    return not any(final.iterdir()) or any((final / name).is_file() for name in manifests)


def check_writable(final: Path) -> None:
    """Create and remove a probe where `final` will be written, so an unwritable place fails in seconds, not after
    the whole run."""
    final = Path(final)
    place = final.parent
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise ValidationError(f"cannot write output dir '{final}': '{place}' is not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=f".{final.name}.{TEMP_TAG}-probe-{host_tag()}-{os.getpid()}-", dir=place)
        os.rmdir(probe)
    except OSError as err:
        raise ValidationError(f"cannot write output dir '{final}': creating a file in '{place}' failed ({err.strerror or err}); "
                              "choose a writable location") from None


def check_output_dir(final: Path, overwrite: bool, manifests: Sequence[str], hint: str = "pass --overwrite",
                     label: str = "output dir ") -> None:
    """The rule for every output dir: new, empty, or (with `overwrite`) a previous output recognised by one of
    `manifests`; anything else is refused before any work, so --overwrite can never delete unrelated files."""
    final = Path(final)
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise ValidationError(f"{label}'{final}' exists and is not a directory")
    if final.is_dir() and any(final.iterdir()):
        if not overwrite:
            raise ValidationError(f"{label}'{final}' exists and is not empty; {hint} to replace it")
        if not is_replaceable(final, manifests):
            raise ValidationError(
                f"{label}'{final}' is not a symerge output (no {' or '.join(manifests)}); refusing to replace it: --overwrite "
                "only replaces an empty dir or a previous output. Choose another dir, or empty it yourself")
    check_writable(final)


def prepare_output_dir(final: Path, overwrite: bool, manifests: Sequence[str], hint: str = "pass --overwrite") -> None:
    """`check_output_dir`, then remove stale temp dirs of an interrupted earlier write: call before any work."""
    check_output_dir(final, overwrite, manifests, hint)
    clean_stale_temp_dirs(final)


@contextmanager
def atomic_directory(final: Path, replace: bool = True, manifests: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it replaces `final`, on failure it is removed.

    With `manifests`, an existing non-empty `final` is replaced only if it holds one of them (our own output).
    The old `final` is moved aside before the new one is renamed in, so a failure never leaves neither."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_dir() and manifests and replace and not is_replaceable(final, manifests):
        check_output_dir(final, True, manifests)  # raises, naming the manifests
    clean_stale_temp_dirs(final)
    tmp = make_temp_dir(final)
    old: Path | None = None
    try:
        yield tmp
        share_modes(tmp)
        if final.exists() or final.is_symlink():
            if not replace and (not final.is_dir() or any(final.iterdir())):
                raise FileExistsError(f"'{final}' already exists")
            old = make_temp_dir(final, "old")
            os.replace(final, old / final.name)
        try:
            os.replace(tmp, final)
        except OSError:
            if old is not None:
                os.replace(old / final.name, final)  # put the previous output back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # the replaced output, now that the new one is in place
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not any(old.iterdir()):
            old.rmdir()  # never delete a previous output that could not be put back


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temp file path beside `path`; on success it replaces `path` (with umask modes), on failure it is
    removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        share_modes(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file beside `path`, then rename: a crash never leaves a half-written file."""
    import torch

    with atomic_file(path) as tmp:
        torch.save(obj, tmp)
