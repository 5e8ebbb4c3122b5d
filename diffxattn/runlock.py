"""One training run per output folder: `output_dir/run.lock` names the run that uses the folder.

The lock file holds the owner's PID and host name. A second run into the same folder is refused with them.
A lock is stale when its host is this machine and its process is gone (killed, crashed): the next run takes
it over. A lock written on another host cannot be checked from here and is respected; its message says to
delete the file once that run is over.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .errors import UserError

LOCK = "run.lock"


class RunLockedError(UserError):
    """Another run is using the output folder."""


def acquire(folder: Path) -> Path:
    """Take `folder/run.lock` for this process (taking over a stale one); RunLockedError if a run holds it."""
    path = Path(folder) / LOCK
    for _ in range(3):  # a stale lock broken by another process at the same moment: try again
        if _create(path):
            return path
        owner = _read(path)
        if owner is None or not _is_stale(owner):
            raise RunLockedError(_busy_message(path, owner))
        _break(path, owner)
    raise RunLockedError(_busy_message(path, _read(path)))


def release(path: Path) -> None:
    """Remove the lock if it is still this process's."""
    if _read(path) == _me():
        path.unlink(missing_ok=True)


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def _create(path: Path) -> bool:
    """Write the lock only if none exists (O_EXCL); its content is written before anyone can read it (link)."""
    content = json.dumps({**_me(), "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(content)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: create exclusively, then write
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(content)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> dict | None:
    """{"pid", "host"} of the lock's owner (plus "since" where known), or None if unreadable."""
    try:
        data = json.loads(path.read_text())
        return {"pid": int(data["pid"]), "host": str(data["host"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_stale(owner: dict) -> bool:
    """The owner ran on this host and its process is gone (a zombie counts as gone)."""
    if owner["host"] != socket.gethostname():
        return False
    if owner["pid"] == os.getpid():  # an earlier process with our PID: we have not taken this lock
        return True
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    try:
        return Path(f"/proc/{owner['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _break(path: Path, owner: dict) -> None:
    """Remove a stale lock, unless another process replaced it meanwhile (then put that one back)."""
    aside = path.with_name(f".{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another process broke it first
        return
    if _read(aside) != owner:
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


def _busy_message(path: Path, owner: dict | None) -> str:
    if owner is None:
        return (f"{path.parent} is in use: {path} exists but names no owner; if no run is using the folder, "
                "delete the lock file, or choose another train.output_dir")
    return (f"{path.parent} is in use by the run of process {owner['pid']} on {owner['host']} ({path}); wait "
            "for it to end or choose another train.output_dir (if that process is gone, delete the lock file)")
