"""Child processes for the multi-process state store tests (``python -m tests.service.states.crash_child MODE ARG``).

* ``sweep JOBS.json``: for each job, fork a process that sets up a store, patches ``os.replace``, ``os.fsync``,
  ``os.unlink``, ``os.mkdir`` and ``os.rmdir`` to record every completed call in the job's trace file and to
  SIGKILL the process at the chosen call, then runs the write. A job whose ``kill`` is ``{"nth": "all"}`` is run
  for n = 1, 2, ... (root ``<root>/n<n>``) until the write completes. Prints one JSON list of results.
* ``hold-upload ROOT``: open an upload, write to it, print its path, wait for a line on stdin, exit.
* ``wait-lock ROOT``: print ``ready``, take the lock of ``m/d``, print ``acquired <inode>``, wait for a line, exit.
* ``hold-lock ROOT``: take the lock of ``m/d``, put a temporary file into ``m/d``, print ``locked``, wait for a
  line, print whether the temporary file is still there, exit.

Nothing in the production code is hooked: the kill points are reached through the ``os`` functions it calls.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.states.store import StateStore

SCENARIOS = {  # target of the write, besides m/d (v1 = OLD1, v2 = OLD2) which every job sets up first
    "existing": ("m", "d"),
    "new_detector": ("m", "e"),
    "new_model": ("n", "x"),
}
OLD1, OLD2, NEW = "old-1", "old-2", "new"
KEEP = 2
"""Versions kept: the writes of these tests also remove the one that falls out of the kept set."""
CHUNKS = 4


def payload(tag: str, size: int = 96 * 1024) -> bytes:
    block = hashlib.sha256(tag.encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def _patch(job: dict[str, Any], trace_fd: int) -> None:
    kill = job["kill"]
    count = 0

    def wrap(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal count
            line = " ".join([name, *(os.path.basename(os.fspath(a)) for a in args if isinstance(a, (str, Path)))])
            count += 1
            matches = kill.get("call") == name and kill.get("match", "") in line
            if count == kill.get("nth") or (matches and kill.get("when") == "before"):
                os.kill(os.getpid(), signal.SIGKILL)
            result = real(*args, **kwargs)
            os.write(trace_fd, f"{line}\n".encode())
            if matches and kill.get("when") == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return call

    for name in ("replace", "fsync", "unlink", "mkdir", "rmdir"):
        setattr(os, name, wrap(name, getattr(os, name)))


def _run_job(job: dict[str, Any]) -> None:
    root = Path(job["root"])
    store = StateStore(root, keep=KEEP)
    store.put("m", "d", payload(OLD1), "X")
    store.put("m", "d", payload(OLD2), "X")
    model, name = SCENARIOS[job["scenario"]]
    data = payload(NEW)
    trace_fd = os.open(job["trace"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    _patch(job, trace_fd)
    if job["op"] == "put":
        store.put(model, name, data, "X")
        return
    step = len(data) // CHUNKS + 1
    with store.upload() as upload:
        for index in range(CHUNKS):
            upload.file.write(data[index * step : (index + 1) * step])
            if job["kill"].get("chunks") == index + 1:
                upload.file.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        store.put_file(model, name, upload.path, "X")


def _fork(job: dict[str, Any]) -> str:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _run_job(job)
        except BaseException:
            traceback.print_exc()
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed"
    return "done" if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else f"failed {status}"


def sweep(jobs_file: str) -> None:
    results = []
    for job in json.loads(Path(jobs_file).read_text()):
        if job["kill"].get("nth") != "all":
            results.append({**job, "status": _fork(job)})
            continue
        for n in range(1, 100):
            run = {**job, "root": f"{job['root']}/n{n}", "trace": f"{job['trace']}.n{n}", "kill": {"nth": n}}
            results.append({**run, "status": _fork(run)})
            if results[-1]["status"] != "killed":
                break
    print(json.dumps(results))


def _wait_line() -> None:
    sys.stdin.readline()


def main() -> None:
    mode, arg = sys.argv[1], sys.argv[2]
    if mode == "sweep":
        sweep(arg)
        return
    store = StateStore(Path(arg))
    if mode == "hold-upload":
        with store.upload() as upload:
            upload.file.write(b"x" * 10_000)
            upload.file.flush()
            print(upload.path, flush=True)
            _wait_line()
    elif mode == "wait-lock":
        print("ready", flush=True)
        with store._locked("m", "d") as held:
            print(f"acquired {os.stat(held.lock_file).st_ino}", flush=True)
            _wait_line()
    elif mode == "hold-lock":
        with store._locked("m", "d"):
            temp = Path(arg) / "m" / "d" / ".active.json.busy.tmp"
            temp.write_bytes(b"{}")
            print("locked", flush=True)
            _wait_line()
            print(f"temp-present {temp.exists()}", flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
