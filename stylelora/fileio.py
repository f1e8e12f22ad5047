"""Crash-safe file writes: readers see the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import tempfile
from glob import escape as glob_escape
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Formats that unpickle on load, so can run code: refused everywhere, with a note to convert.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; write it inside the block. On success it is flushed to
    disk and renamed over `path`; on any error it is deleted and `path` is left as it was.
    The temporary name keeps the real suffix last, so PIL and friends infer the format from it, and
    holds the writer's pid, so a write killed mid-way (SIGKILL, power loss) is swept by the next one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_orphans(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=f".tmp{path.suffix}",
                                dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync(tmp)
        # mkstemp makes the file owner-only (0600); give it the mode a plain open() would have, or
        # the replaced file's, so other users and programs (a ComfyUI service, say) can still read it.
        os.chmod(tmp, _mode_of(path))
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on device while writing {path}: free some space "
                                        "and write it again (nothing was written under that name)") from e
        raise


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """atomic_path for a folder: yield a fresh sibling folder NAME.tmp to write inside the block. On
    success it takes the place of `path` (an old folder is renamed aside to NAME.deleting first, and
    deleted after), so an interrupted write leaves the old folder whole, never a mix of old and new
    files; on any error it is deleted and `path` is left as it was."""
    path = Path(path)
    tmp, aside = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".deleting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    if path.exists():
        os.replace(path, aside)
    os.replace(tmp, path)
    fsync(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


def remove_folder(folder: Path) -> None:
    """Delete a folder so that no half-deleted one ever sits under its name (rmtree removes files
    one by one): rename it aside to NAME.deleting, atomically, then delete it."""
    if folder.exists():
        trash = folder.with_name(folder.name + ".deleting")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _mode_of(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it (os.umask can only set it: racy in threads)."""
    try:
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("Umask:"))
        return int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):
        return 0o022


def _sweep_orphans(path: Path) -> None:
    """Delete temporaries of `path` left by writers that no longer run (on this machine)."""
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp{glob_escape(path.suffix)}"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process (EPERM), or no way to tell: keep its file
        return True
    return True


def file_identity(path: str | os.PathLike) -> tuple[int, int, int, int] | None:
    """(device, inode, mtime in ns, size) of what is at `path` now, or None when nothing is: two
    equal identities mean the same file, unchanged (as far as stat can tell)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


@contextmanager
def temp_beside(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh hidden name beside `path` (not created), named as atomic_path names its temporaries,
    so one left by a killed process is swept by the next write of `path`; deleted when the block
    ends. Write it, then link_new / publish_beside / os.replace it into place. Its mode is set to
    what atomic_path would give `path` (the replaced file's, or a plain open()'s)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_orphans(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def set_mode_for(tmp: Path, path: Path) -> None:
    """Give `tmp` the mode `path` has (or a new file would get), before it takes `path`'s place."""
    os.chmod(tmp, _mode_of(path))


def link_new(tmp: Path, path: Path) -> None:
    """Publish the finished file `tmp` as `path` only if nothing is there: a hard link fails when the
    name is taken, so of two writers racing for a name one gets FileExistsError and nothing is
    replaced (what the UI's uploads, converts and merges rely on). On a filesystem without hard links,
    a check then a rename (a small race). The caller deletes `tmp` after (it may be gone)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
        os.replace(tmp, path)
    fsync(path.parent)


def publish_beside(tmp: Path, path: Path, limit: int = 1000) -> Path:
    """link_new `tmp` as `path`, or else as the first free `STEM-2.SUFFIX`, `STEM-3.SUFFIX`, ...
    beside it. Returns the path used; nothing is ever replaced."""
    for k in range(1, limit + 1):
        candidate = path if k == 1 else path.with_name(f"{path.stem}-{k}{path.suffix}")
        try:
            link_new(tmp, candidate)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"{path} and {limit - 1} numbered names beside it are all taken: "
                                        "move some files away", str(path))


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk: a rename must not outlive the data it names."""
    if os.name == "nt" and path.is_dir():  # Windows cannot open a folder for fsync
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
