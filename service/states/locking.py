"""The write lock of one detector under a state directory, shared by every process writing it (``flock``).

``<state_dir>/<model>/.<detector>.lock`` is locked exclusively, besides this process's own lock. A holder may
remove the lock file (a delete, a failed first write, a cleanup: ``held.drop``); whoever acquires a lock checks that
the path still names the file it locked, and otherwise locks again.
"""

from __future__ import annotations

import fcntl
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from service.settings import check_name
from service.states.cleanup import HeldLock, same_file

__all__ = ["detector_lock"]


@contextmanager
def detector_lock(root: Path, model: str, name: str, process_lock: threading.Lock) -> Iterator[HeldLock]:
    """Exclusive over this process (``process_lock``) and every other one writing the same detector under ``root``.

    A holder may remove the lock file (``held.drop``: a delete, a failed first write, a cleanup); a waiter that
    then gets the lock of the removed file sees that the path names another file (or none) and locks again. A
    model folder created here is removed again when the lock file is dropped, if it is empty."""
    base = root / check_name("model", model)
    held = HeldLock(base / f".{check_name('detector', name)}.lock")
    with process_lock:
        created = False
        while True:
            try:
                base.mkdir(parents=True)
                created = True
            except FileExistsError:
                pass
            try:
                handle = open(held.lock_file, "a+b")  # noqa: SIM115 (closed below or when released)
            except FileNotFoundError:
                continue  # the model folder was just removed (a failed first write): create it again
            except BaseException:
                if created:
                    with suppress(OSError):
                        base.rmdir()
                raise
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                if same_file(handle.fileno(), held.lock_file):
                    break
            except BaseException:
                handle.close()
                raise
            handle.close()  # we locked a removed lock file: lock the one there now
        try:
            yield held
        finally:
            try:
                if held.drop:
                    held.lock_file.unlink(missing_ok=True)
            finally:
                handle.close()  # releases the flock
            if held.drop and created:
                with suppress(OSError):
                    base.rmdir()
