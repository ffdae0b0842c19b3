"""Test-only helpers that follow README.md literally: its ```bash blocks parsed into commands, and a shell
that runs them one after another in a clone as a user's terminal would.

`readme_commands()`: every ```bash block of README.md in document order, each physical line's `# comment`
stripped (a `#` that starts a word outside quotes, as bash reads it), `\\` continuations joined into one
command with single spaces. Each command remembers its block's heading and its index in the block.

`Terminal`: one shell session in a clone. Each command runs in a fresh `bash` that starts from the
environment the previous command left (`env -0` written after it), so `export ...` and `source
.venv/bin/activate` carry over to the next commands exactly as in one terminal. Every process the terminal
starts carries a marker variable in its environment; `Terminal.stop_marked()` ends exactly those processes
(psutil: SIGTERM, then SIGKILL) and nothing else on the machine, which is how a daemonizing `ray start`
(its processes outlive the shell that started them) is stopped without `ray stop`.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
from clone_support import REPO, clone_env, stop_group

MARKER = "README_TERMINAL_ID"
# bash's own bookkeeping, not part of what one command hands the next
_SHELL_VARS = {"_", "SHLVL", "PWD", "OLDPWD"}


@dataclass(frozen=True)
class Command:
    """One README command: `text` as a user types it (continuations joined, comment stripped)."""

    text: str
    heading: str  # the nearest `#`/`##`/`###` heading above its block
    block: int  # index of its ```bash block in the README (0-based)


def strip_comment(line: str) -> str:
    """`line` without its bash comment: a `#` at the start of a word and outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str | None = None) -> list[Command]:
    """Every command of every ```bash block of README.md (or `text`), in document order."""
    text = (REPO / "README.md").read_text(encoding="utf-8") if text is None else text
    commands: list[Command] = []
    heading, block, in_block, pending = "", -1, False, ""
    for raw in text.splitlines():
        if not in_block:
            if raw.startswith("#"):
                heading = raw.lstrip("#").strip()
            elif raw.strip() == "```bash":
                in_block, block = True, block + 1
            continue
        if raw.strip() == "```":
            assert not pending, f"README block {block} ({heading}) ends inside a `\\` continuation: {pending!r}"
            in_block = False
            continue
        line = strip_comment(raw).strip()
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            commands.append(Command(line, heading, block))
    assert not in_block, "README.md ends inside a ```bash block"
    return commands


class Terminal:
    """A shell session in `cwd` (see the module docstring); `logs` gets one log file per command."""

    def __init__(self, cwd: Path, logs: Path, **env: str):
        self.cwd, self.logs = cwd, logs
        self.id = uuid.uuid4().hex
        self.env = {**clone_env(), **env, MARKER: self.id}
        self.count = 0
        logs.mkdir(parents=True, exist_ok=True)

    def _script(self, command: str, name: str) -> tuple[Path, Path, Path]:
        self.count += 1
        stem = f"{self.count:02d}-{name}"
        script, state, log = (self.logs / f"{stem}.sh", self.logs / f"{stem}.env", self.logs / f"{stem}.log")
        # the command exactly as given, then the environment it leaves for the next one
        script.write_text(f"{command}\n__rc=$?\nenv -0 > {state}\nexit $__rc\n")
        return script, state, log

    def run(self, command: str, name: str, timeout: float, keep_children: bool = False) -> tuple[int, str]:
        """Run `command` to its end in a fresh bash (its own process group); (exit code, its output). What it
        left running in its process group is ended, unless `keep_children` (a daemon it started, stopped
        later by `stop_marked`)."""
        script, state, log = self._script(command, name)
        with open(log, "w") as out:
            proc = subprocess.Popen(["bash", str(script)], cwd=self.cwd, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                if rc is None or not keep_children:
                    stop_group(proc)
        output = log.read_text(errors="replace")
        if rc is None:
            return 124, output + f"\n[readme test: timed out after {timeout:.0f} s]"
        if state.is_file():
            pairs = (item.split("=", 1) for item in state.read_bytes().decode().split("\0") if "=" in item)
            self.env = {k: v for k, v in pairs if k not in _SHELL_VARS}
            assert self.env.get(MARKER) == self.id, f"{command!r} dropped the terminal's marker variable"
        return rc, output

    def serve(self, command: str, name: str, port: int, path: str, timeout: float) -> tuple[subprocess.Popen, Path]:
        """Start a command that serves until stopped (`mlflow ui`) in its own process group; returns once
        http://127.0.0.1:`port``path` answers (AssertionError with its log if it exits or times out)."""
        script, _, log = self._script(command, name)
        with open(log, "w") as out:
            proc = subprocess.Popen(["bash", str(script)], cwd=self.cwd, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_http(f"http://127.0.0.1:{port}{path}", timeout, proc)
        except BaseException:
            stop_group(proc)
            raise AssertionError(f"{command!r} did not serve :{port}{path}:\n{log.read_text()[-4000:]}") from None
        return proc, log

    def marked(self) -> list[psutil.Process]:
        """This terminal's processes still alive (their environment carries its marker), wherever they are."""
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get(MARKER) == self.id:
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def stop_marked(self, grace_s: float = 20.0) -> int:
        """End every process this terminal started that is still alive (SIGTERM, SIGKILL after grace_s);
        returns how many there were."""
        procs = self.marked()
        for proc in procs:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        return len(procs)


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Return once `url` answers with HTTP 2xx; TimeoutError after `timeout` s (RuntimeError if `proc` exits)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                if 200 <= response.status < 300:
                    return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before {url} answered")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(1)


def fill(command: str, placeholders: dict[str, str], **values: str) -> str:
    """`command` with each placeholder replaced in one pass (longest key first, so `[--out DIR]` wins over a
    shorter key; a replacement is never searched again), each replacement formatted with `values` (e.g.
    {clone}); the spaces a dropped one leaves are collapsed (no README command quotes a run of spaces)."""
    pattern = "|".join(re.escape(key) for key in sorted(placeholders, key=len, reverse=True))
    command = re.sub(pattern, lambda m: placeholders[m.group(0)].format(**values), command)
    return re.sub(r" {2,}", " ", command).strip()
