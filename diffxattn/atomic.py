"""Atomic writes: a file or folder a command writes is either the old one or the complete new one, never a mix.

The new content goes to a temporary name in the same folder (so on the same file system) and is fsynced; one
`os.replace` then puts it in place. A write that fails (a full disk, a kill) leaves the old file as it was and
removes the temporary one. Folders are replaced the same way; `protect` refuses to replace a folder whose loss
would take more than the user asked for (the working directory or home, or a parent of them: `-o ..`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from .errors import DISK_FULL, UserError


class ProtectedPathError(UserError):
    """An output path whose replacement would delete the working directory, one of its parents, or home."""


def _tmp_name(path: Path, tag: str) -> Path:
    # the suffix stays last, so writers that pick a format from the extension (PIL) still can
    return path.with_name(f".{tag}-{os.getpid()}-{path.name}")


def write_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` writes the content to a temporary file next to `path`, which then replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path, "tmp")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in DISK_FULL and e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e  # the message names the file that did not fit
        raise
    return path


def save_image(image, path: str | os.PathLike) -> Path:
    """A PIL image saved atomically (format from the extension)."""
    return write_file(path, lambda tmp: image.save(tmp))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def protect(path: Path, keep: tuple[Path, ...] = ()) -> None:
    """Refuse `path` as a folder to replace if it is, or holds, the working directory, home, or a path in `keep`
    (e.g. the checkpoint being exported)."""
    target = Path(path).resolve()  # symlinks followed: '-o link-to-home' is home
    guarded = [("the working directory", Path.cwd()), ("your home folder", Path.home())]
    guarded += [(str(k), Path(k).resolve()) for k in keep]
    for what, kept in guarded:
        if kept.is_relative_to(target):  # the folder itself or one of its parents
            raise ProtectedPathError(f"refusing to replace {str(path)!r}: it is or contains {what} ({kept}); "
                                     "give a new folder name")


def replace_folder(out: str | os.PathLike, write: Callable[[Path], None], keep: tuple[Path, ...] = ()) -> Path:
    """`write(tmp)` fills a fresh folder next to `out`; once complete (and fsynced) it takes `out`'s place and
    the old `out`, if any, is deleted. Returns `out` as an absolute path."""
    out = Path(os.path.abspath(out))
    protect(out, keep)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = _tmp_name(out, "tmp"), _tmp_name(out, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists() or out.is_symlink():
        os.replace(out, old)  # a crash from here to the next line leaves both complete folders on disk
        os.replace(tmp, out)
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    else:
        os.replace(tmp, out)
    _fsync(out.parent)
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))
