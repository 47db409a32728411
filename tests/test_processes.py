"""Process supervision of `fedmoe serve` / `fedmoe join` (fedmoe/processes.py), without Flower:
process trees, stopping a tree, zombies and vanished pids, and `supervise`'s exit codes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from fedmoe.processes import Child, alive, free_port, kill, process_tree, stop_tree, supervise


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture
def shell() -> Iterator[subprocess.Popen[bytes]]:
    """bash with a background sleep (a grandchild once bash is gone) and a foreground one."""
    process = subprocess.Popen(["bash", "-c", "sleep 30 & sleep 30"])
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def test_process_tree_finds_the_children_and_stop_tree_kills_them_all(shell: subprocess.Popen[bytes]) -> None:
    assert _until(lambda: len(process_tree(shell.pid)) >= 2), "the background sleep never showed up"
    tree = process_tree(shell.pid)
    assert tree[0] == shell.pid
    assert {psutil.Process(p).name() for p in tree[1:]} == {"sleep"}
    assert all(alive(p) for p in tree)

    started = time.monotonic()
    stop_tree(shell.pid, timeout=1.0)  # bash dies on SIGTERM; the orphaned sleep needs the SIGKILL
    assert time.monotonic() - started < 10
    shell.wait(timeout=5)
    assert _until(lambda: not any(alive(p) for p in tree), 5.0), [p for p in tree if alive(p)]


def test_a_vanished_pid_is_no_error() -> None:
    process = subprocess.Popen(["true"])
    process.wait()
    assert not alive(process.pid)
    assert process_tree(process.pid) == [process.pid]  # just itself: no descendants, no exception
    stop_tree(process.pid, timeout=0.5)
    kill([process.pid])


def test_a_zombie_counts_as_dead() -> None:
    process = subprocess.Popen(["true"])
    try:
        assert _until(lambda: psutil.Process(process.pid).status() == psutil.STATUS_ZOMBIE)
        os.kill(process.pid, 0)  # the pid still exists ...
        assert not alive(process.pid)  # ... but nothing runs there
        assert alive(os.getpid())
    finally:
        process.wait()


def test_supervise_returns_the_exit_code_of_a_child_that_ends(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    child = Child.start("child", [sys.executable, "-c", "print('hello from the child'); raise SystemExit(4)"],
                        os.environ, log)
    assert supervise(child) == 4
    assert child.said("hello from the child")
    assert "hello from the child" in log.read_text()


def test_sigterm_stops_the_child_and_its_tree_and_supervise_returns_0(tmp_path: Path) -> None:
    stray: list[int] = []

    def record(signum: int, _frame: object) -> None:  # a SIGTERM outside `supervise` must not kill pytest
        stray.append(signum)

    previous = signal.signal(signal.SIGTERM, record)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    source = ("import signal, subprocess, sys, time\n"
              "sleeper = subprocess.Popen(['sleep', '30'])\n"
              "print(sleeper.pid, flush=True)\n"
              "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"  # leaves its sleep behind
              "time.sleep(30)\n")
    child = Child.start("child", [sys.executable, "-c", source], os.environ, tmp_path / "child.log")
    try:
        assert _until(lambda: len(child.tail) > 0), "the child never started its sleep"
        sleeper = int(child.tail[0])
        timer.start()
        started = time.monotonic()
        assert supervise(child, grace=5.0) == 0
        assert time.monotonic() - started < 15
        assert _until(lambda: not alive(sleeper), 5.0), "the child's sleep outlived the supervisor"
        assert signal.getsignal(signal.SIGTERM) is record  # the previous handler is back
        assert not stray  # the SIGTERM went to supervise
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
        if child.process.poll() is None:
            child.process.kill()
        child.process.wait()


def test_free_port_is_a_port_nobody_listens_on() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
