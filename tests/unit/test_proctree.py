"""launch.proctree: a timed-out job is killed with every process it started, including ranks
that moved to process groups of their own (as prterun puts them)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from launch.proctree import descendants, kill_session, kill_tree

# A parent that starts a child in a new session (its own process group), which starts a
# grandchild; the parent prints the two pids and waits.
GRANDCHILD = "import time; time.sleep(60)"
CHILD = (
    "import subprocess, sys, time; "
    f"g = subprocess.Popen([sys.executable, '-c', {GRANDCHILD!r}]); "
    "print(g.pid, flush=True); time.sleep(60)"
)
TREE = f"""
import subprocess, sys, time
child = subprocess.Popen(
    [sys.executable, "-c", {CHILD!r}], stdout=subprocess.PIPE, text=True, start_new_session=True
)
print(child.pid, child.stdout.readline().strip(), flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_kill_tree_kills_descendants_in_other_process_groups():
    root = subprocess.Popen(
        [sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        child, grandchild = (int(x) for x in root.stdout.readline().split())
        assert os.getpgid(child) != os.getpgid(root.pid)  # out of reach of killpg(root)
        assert {child, grandchild} <= set(descendants(root.pid))
        kill_tree(root.pid)
        root.wait(10)
        deadline = time.monotonic() + 10
        while (_alive(child) or _alive(grandchild)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child) and not _alive(grandchild)
    finally:
        if root.poll() is None:
            root.kill()


def test_kill_session_kills_what_a_launcher_left_behind_after_it_exited():
    # the launcher starts a child in a process group of its own (as prterun does) and exits:
    # the orphan is found by the launcher's session
    orphan_maker = (
        "import os, subprocess, sys; "
        f"c = subprocess.Popen([sys.executable, '-c', {GRANDCHILD!r}], process_group=0); "
        "print(c.pid, flush=True)"
    )
    launcher = subprocess.Popen(
        [sys.executable, "-c", orphan_maker],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    orphan = int(launcher.stdout.readline())
    launcher.wait(10)
    assert _alive(orphan) and orphan not in descendants(launcher.pid)
    assert kill_session(launcher.pid) == [orphan]
    deadline = time.monotonic() + 10
    while _alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(orphan)
    assert kill_session(launcher.pid) == []
