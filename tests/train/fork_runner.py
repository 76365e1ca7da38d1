"""Runs train.py many times without paying its 8-second import each time: imports once, then forks one
child per attempt, each a real process that trains, writes checkpoints and can be SIGKILLed.

    python tests/train/fork_runner.py     (then one JSON attempt per line on stdin, one JSON result per line out)

An attempt is {"args": [train.py arguments], "fault": tests/train/faults.py points or "", "kill_after": seconds or null,
"log": path, "signal": the signal kill_after sends (default SIGKILL), "signal_on": text: send it once the log has it};
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

    def __init__(self, logs: Path, tmpdir: Path, env: dict | None = None):
        # Its own TMPDIR: streaming's lock files of these runs, apart from other test sessions on the machine.
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", TMPDIR=str(tmpdir),
                   **(env or {}))
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__))], cwd=Path(__file__).resolve().parents[2], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.logs, self.tmpdir, self.n = logs, tmpdir, 0

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)

    def run(self, recipe: Path, *overrides: str, fault: str = "", kill_after: float | None = None,
            signal: str = "SIGKILL", signal_on: str | None = None) -> tuple[dict, str]:
        self.n += 1
        log = self.logs / f"attempt{self.n}.log"
        attempt = {"args": [str(recipe), *overrides], "fault": fault, "kill_after": kill_after, "log": str(log),
                   "signal": signal, "signal_on": signal_on}
        self.proc.stdin.write(json.dumps(attempt) + "\n")
        self.proc.stdin.flush()
        result = json.loads(self.proc.stdout.readline())
        return result, log.read_text()


def attempt(args: list[str], fault: str, kill_after: float | None, log: str, sig: str = "SIGKILL",
            signal_on: str | None = None) -> dict:
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        from tests.train.faults import train_with_faults

        sys.exit(train_with_faults(fault, args))  # unwinds and exits as train.py would, running the atexit handlers
    deadline = None if kill_after is None else time.monotonic() + kill_after
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if deadline is not None and time.monotonic() >= deadline:
            os.kill(pid, signal.Signals[sig])
            deadline = None
        if signal_on is not None and Path(log).exists() and signal_on in Path(log).read_text(errors="replace"):
            os.kill(pid, signal.Signals[sig])
            signal_on = None
        time.sleep(0.01)
    return {"rc": os.waitstatus_to_exitcode(status), "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # for tests.train.faults
    import ettin_train.train.run  # noqa: F401  (the heavy imports: torch, composer, transformers)
    import tests.train.faults  # noqa: F401

    print("ready", flush=True)
    for line in sys.stdin:
        a = json.loads(line)
        print(json.dumps(attempt(a["args"], a.get("fault", ""), a.get("kill_after"), a["log"], a.get("signal", "SIGKILL"),
                                 a.get("signal_on"))), flush=True)
