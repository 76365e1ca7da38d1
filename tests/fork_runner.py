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
import subprocess
import sys
import time
from pathlib import Path


class Runner:
    """The tests' side: starts this file as a process; `run(recipe, *overrides, fault=..., kill_after=...)`
    runs one attempt and returns (result, its log)."""

    def __init__(self, logs: Path, tmpdir: Path):
        # Its own TMPDIR: streaming's lock files of these runs, apart from other test sessions on the machine.
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", TMPDIR=str(tmpdir))
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__))], cwd=Path(__file__).resolve().parent.parent, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.logs, self.tmpdir, self.n = logs, tmpdir, 0

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)

    def run(self, recipe: Path, *overrides: str, fault: str = "", kill_after: float | None = None) -> tuple[dict, str]:
        self.n += 1
        log = self.logs / f"attempt{self.n}.log"
        attempt = {"args": [str(recipe), *overrides], "env": {"ETTIN_FAULT": fault}, "kill_after": kill_after, "log": str(log)}
        self.proc.stdin.write(json.dumps(attempt) + "\n")
        self.proc.stdin.flush()
        result = json.loads(self.proc.stdout.readline())
        return result, log.read_text()


def attempt(args: list[str], env: dict, kill_after: float | None, log: str) -> dict:
    pid = os.fork()
    if pid == 0:
        os.environ.update(env)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        from ettin_train.cli import main

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
    import ettin_train.cli  # noqa: F401
    import ettin_train.train.run  # noqa: F401  (the heavy imports: torch, composer, transformers)

    print("ready", flush=True)
    for line in sys.stdin:
        a = json.loads(line)
        print(json.dumps(attempt(a["args"], a.get("env", {}), a.get("kill_after"), a["log"])), flush=True)
