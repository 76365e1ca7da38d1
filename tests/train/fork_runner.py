"""Runs train.py many times without paying its 8-second import each time: imports once, then forks one
child per attempt, each a real process that runs the script as `python SCRIPT ARGS` would (its `__main__`,
its exit status, its traceback on stderr), writes checkpoints and can be SIGKILLed.

    python tests/train/fork_runner.py     (then one JSON attempt per line on stdin, one JSON result per line out)

An attempt is {"argv": [script, arguments] or ["-m", module, arguments], "stdout": path, "stderr": path (may be the same), "kill_after":
seconds or null, "signal": what kill_after sends (default SIGKILL), "signal_on": text: send it once stdout has it,
"cwd": folder, "env": environment}; its result {"rc": exit status, "signal": the signal that
ended it or null, "killed": whether kill_after fired}. Two users: `Runner` (the reliability tests: train.py
with tests/train/faults.py points, SIGKILLed at chosen moments; the test decides each attempt after reading
the folder the previous one left) and conftest.run_train (every single-process run of train.py in the suite).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAULTS = ROOT / "tests" / "train" / "faults.py"


class ForkServer:
    """The tests' side of one pre-imported process: `attempt(...)` forks one child and waits for it."""

    def __init__(self, env: dict | None = None):
        env = dict(env or os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        self.env = env
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__))], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def attempt(self, argv: list[str], stdout: Path, stderr: Path, kill_after: float | None = None,
                cwd: Path = ROOT, env: dict | None = None, signal: str = "SIGKILL", signal_on: str | None = None,
                launcher: list[str] | None = None) -> dict:
        request = {"argv": [str(a) for a in argv], "stdout": str(stdout), "stderr": str(stderr),
                   "kill_after": kill_after, "signal": signal, "signal_on": signal_on, "cwd": str(cwd), "env": env or self.env,
                   "launcher": launcher}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server (pid {self.proc.pid}) ended with status {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Runner(ForkServer):
    """The reliability tests' side: `run(recipe, *overrides, fault=..., kill_after=...)` runs train.py with the
    fault points (tests/train/faults.py) as one attempt and returns (result, its log). Its own TMPDIR keeps
    streaming's lock files of these runs apart from other test sessions on the machine."""

    def __init__(self, logs: Path, tmpdir: Path):
        super().__init__(dict(os.environ, TMPDIR=str(tmpdir)))
        self.logs, self.tmpdir, self.n = logs, tmpdir, 0

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, recipe: Path, *overrides: str, fault: str = "", kill_after: float | None = None,
            signal: str = "SIGKILL", signal_on: str | None = None) -> tuple[dict, str]:
        self.n += 1
        log = self.logs / f"attempt{self.n}.log"
        result = self.attempt([FAULTS, fault, recipe, *overrides], log, log, kill_after=kill_after, signal=signal,
                              signal_on=signal_on)
        return result, log.read_text()


def _child(a: dict) -> None:
    """In the forked child: become `python SCRIPT ARGS` (or, with "launcher", `composer LAUNCHER SCRIPT ARGS`)
    run in `cwd` with `env`, and never return."""
    os.chdir(a["cwd"])
    os.environ.clear()
    os.environ.update(a["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    out = os.open(a["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = out if a["stderr"] == a["stdout"] else os.open(a["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(err, 2)
    if a.get("launcher") is not None:
        os.setpgid(0, 0)  # the launcher and its ranks: one group, for kill_after
        _exit(_composer_launcher(a["launcher"], a["argv"]))
    _run(a["argv"], a["cwd"])


def _run(argv: list[str], cwd: str) -> None:
    import runpy

    try:
        if argv[0] == "-m":  # `python -m MODULE ARGS`
            sys.argv, sys.path[0] = ["-m", *argv[2:]], cwd
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = str(Path(argv[0]).resolve().parent)  # as `python SCRIPT` sets it
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:  # the script's own exit status, as the interpreter turns it into one
        if e.code is None or isinstance(e.code, int):
            _exit(e.code or 0)
        print(e.code, file=sys.stderr)
        _exit(1)
    except BaseException:
        sys.excepthook(*sys.exc_info())  # what `python SCRIPT` prints for an uncaught exception
        _exit(1)
    _exit(0)


class _ForkedRank:
    """What Composer's launcher uses of the `subprocess.Popen` of a rank, for a rank forked from this process:
    the rank runs its command's script (`cmd[1:]`) with the environment the launcher set for it."""

    root_handlers: list = []  # the logging handlers before the launcher added its own

    def __init__(self, cmd: list[str], stdout=None, stderr=None, text: bool = True):
        import logging
        import tempfile
        import weakref

        self.args, self.returncode, self.stdout, self.stderr = cmd, None, stdout, stderr
        self.pid = os.fork()
        if self.pid:
            return
        # Undo what the launcher did in this process that a freshly started rank does not have: its log
        # handler, and its log folder's clean-up at exit (the launcher removes that folder itself).
        logging.root.handlers[:] = self.root_handlers
        logging.getLogger("composer.cli.launcher").setLevel(logging.NOTSET)
        for f in list(weakref.finalize._registry):
            if isinstance((f.peek() or [None])[0], tempfile.TemporaryDirectory):
                f.detach()
        if stdout is not None:  # ranks > 0 write to files; rank 0 to the launcher's own output
            os.dup2(stdout.fileno(), 1)
            os.dup2(stdout.fileno() if stderr in (None, subprocess.STDOUT) else stderr.fileno(), 2)
        _run(cmd[1:], os.getcwd())

    def poll(self):
        if self.returncode is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def _composer_launcher(launcher_args: list[str], argv: list[str]) -> int:
    """Composer's launcher itself (`composer.cli.launcher.main`: its arguments, the ranks' environment, output
    files, watching, clean-up and exit status), with each rank forked from this pre-imported process instead
    of started as a new Python."""
    import logging
    import types

    from composer.cli import launcher

    _ForkedRank.root_handlers = list(logging.root.handlers)
    launcher.subprocess = types.SimpleNamespace(Popen=_ForkedRank, STDOUT=subprocess.STDOUT,
                                                CalledProcessError=subprocess.CalledProcessError)
    sys.argv = ["composer", *launcher_args, *argv]
    return launcher.main()


def _exit(code: int) -> None:
    """What the interpreter's exit does that a user can see (wait for threads, atexit handlers, flushed output),
    without tearing down every module: that touches each page the child shares with the server (~2 s of CPU)."""
    import atexit
    import threading

    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def attempt(a: dict) -> dict:
    pid = os.fork()
    if pid == 0:
        _child(a)
    kill_after, sig, signal_on = a.get("kill_after"), signal.Signals[a.get("signal", "SIGKILL")], a.get("signal_on")
    deadline = None if kill_after is None else time.monotonic() + kill_after
    killed = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if deadline is not None and time.monotonic() >= deadline:
            os.killpg(pid, sig) if a.get("launcher") is not None else os.kill(pid, sig)
            deadline, killed = None, True
        out = Path(a["stdout"])
        if signal_on is not None and out.exists() and signal_on in out.read_text(errors="replace"):
            os.kill(pid, sig)
            signal_on = None
        time.sleep(0.01)
    return {"rc": os.waitstatus_to_exitcode(status), "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "killed": killed}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # for tests.train.faults
    import ettin_train.cli  # noqa: F401
    import ettin_train.train.run  # noqa: F401  (the heavy imports: torch, composer, transformers)
    import composer.cli.launcher  # noqa: F401
    import tests.train.faults  # noqa: F401

    import gc

    gc.freeze()  # the children's collections then leave the imported objects' pages shared
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(attempt(json.loads(line))), flush=True)
