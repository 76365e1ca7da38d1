"""Runs train.py many times without paying its 8-second import each time: imports once, then forks one
child per attempt, each a real process that trains, writes checkpoints and can be SIGKILLed.

    python tests/fork_runner.py     (then one JSON attempt per line on stdin, one JSON result per line out)

An attempt is {"args": [train.py arguments], "env": {...}, "kill_after": seconds or null, "log": path};
its result {"rc": exit status, "signal": the signal that ended it or null}. The test decides each
attempt after reading the folder the previous one left.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import ettin_train.composer_adapter  # noqa: E402,F401  (the heavy imports: torch, composer, transformers)
from ettin_train.cli import main  # noqa: E402


def attempt(args: list[str], env: dict, kill_after: float | None, log: str) -> dict:
    pid = os.fork()
    if pid == 0:
        os.environ.update(env)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.exit(main(args))  # unwinds and exits as train.py would, running the atexit handlers
    deadline = None if kill_after is None else time.monotonic() + kill_after
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if deadline is not None and time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = None
        time.sleep(0.01)
    return {"rc": os.waitstatus_to_exitcode(status), "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}


if __name__ == "__main__":
    print("ready", flush=True)
    for line in sys.stdin:
        a = json.loads(line)
        print(json.dumps(attempt(a["args"], a.get("env", {}), a.get("kill_after"), a["log"])), flush=True)
