"""Supervision of the Flower processes fedmoe starts: a child with its output, its process tree,
stopping that tree (SIGTERM, then SIGKILL), waiting on its signals, and local ports.

Process trees are read with psutil; a process that has vanished (or is a zombie) counts as dead,
never as an error.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console

from fedmoe.flower_deploy import DeployError

console = Console(stderr=True)


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants; just `pid` when it has gone (or cannot be read)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return [pid]
    return [pid, *(child.pid for child in children)]


def alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie is dead for our purposes, another user's process alive."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ZombieProcess included
        return False
    except psutil.AccessDenied:
        return True


def kill(pids: Sequence[int]) -> None:
    """SIGKILL those of `pids` still alive."""
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def stop_tree(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM `pid` (it stops its own children gracefully), then SIGKILL whatever of its tree is
    left after `timeout`. The tree is read before signalling: orphans are re-parented to init."""
    tree = process_tree(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in tree):
        time.sleep(0.2)
    kill(tree + [r for p in tree if alive(p) for r in process_tree(p)])


@dataclass
class Child:
    """A Flower process run by a fedmoe supervisor; its output goes to `log` (or our stdout)
    through a reader thread that keeps the last lines, so the supervisor can say why it ended
    (flower-supernode reports a refused key in its log, not in its exit status)."""

    name: str
    process: subprocess.Popen[bytes]
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=200))
    reader: threading.Thread | None = None

    @classmethod
    def start(cls, name: str, argv: Sequence[str], env: Mapping[str, str], log: Path | None) -> Child:
        process = subprocess.Popen(list(argv), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        child = cls(name, process)
        child.reader = threading.Thread(target=child._pump, args=(log,), daemon=True, name=f"{name}-output")
        child.reader.start()
        return child

    def _pump(self, log: Path | None) -> None:
        assert self.process.stdout is not None
        sink = open(log, "ab") if log is not None else sys.stdout.buffer  # noqa: SIM115
        try:
            for line in iter(self.process.stdout.readline, b""):
                sink.write(line)
                sink.flush()
                self.tail.append(line.decode(errors="replace"))
        finally:
            if log is not None:
                sink.close()

    def said(self, text: str, wait: float = 3.0) -> bool:
        """Whether the child's output contained `text` (waits briefly for the output to drain)."""
        if self.reader is not None:
            self.reader.join(timeout=wait)
        return any(text in line for line in list(self.tail))

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            stop_tree(self.process.pid, timeout)
        return self.process.wait()


def supervise(child: Child, grace: float = 15.0) -> int:
    """Wait for `child`; SIGTERM/SIGINT stop it and its tree and return 0, else its exit code.

    The handler only records the signal: the main loop does the stopping, so no wait is re-entered
    from inside a signal handler (Popen.wait holds a non-reentrant lock).
    """
    requested: list[int] = []

    def handle(signum: int, _frame: Any) -> None:
        requested.append(signum)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    tree: list[int] = []
    deadline = 0.0
    try:
        while True:
            try:
                code = child.process.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if requested and not tree:
                console.print(f"{signal.Signals(requested[0]).name}: stopping {child.name} (pid {child.process.pid})")
                tree = process_tree(child.process.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.process.pid, signal.SIGTERM)
                deadline = time.monotonic() + grace
            elif tree and time.monotonic() > deadline:
                kill(tree)
        if requested:  # what the child started (SuperExec, app processes) goes with it
            tree = tree or process_tree(child.process.pid)
            end = time.monotonic() + 5.0
            while time.monotonic() < end and any(alive(p) for p in tree[1:]):
                time.sleep(0.2)
            kill(tree[1:])
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0 if requested else code


def sigterm_interrupts() -> None:
    """Until `supervise` takes over, SIGTERM interrupts start-up like Ctrl-C (the child is stopped)."""

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def wait_for_port(host: str, port: int, timeout: float, child: Child | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and child.process.poll() is not None:
            raise DeployError(f"{child.name} exited with code {child.process.returncode} while starting")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise DeployError(f"{host}:{port}: nothing listening after {timeout:.0f}s")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
