"""The launcher's verdict on an attempt (:mod:`launch.outcome`) and its output filter
(:mod:`launch.noise`), on run directories and output the tests write."""

from __future__ import annotations

import io
import json
import threading

from launch.noise import OutputFilter
from launch.outcome import NODE_LOST, UNFINISHED, judge

# PRRTE 3.0's message when a node's daemon is gone (help-errmgr-base.txt, [node-died])
NODE_DIED = """--------------------------------------------------------------------------
PRTE has lost communication with a remote daemon.

  HNP daemon   : [prterun-n1-4242@0,0] on node n1
  Remote daemon: [prterun-n1-4242@0,2] on node n3

This is usually due to either a failure of the TCP network
connection to the node, or possibly an internal failure of
the daemon itself. We cannot recover from this failure, and
therefore will terminate the job.
--------------------------------------------------------------------------
"""


def test_a_finished_run_is_0_whatever_mpirun_returned(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"finished": True}))
    assert judge(str(tmp_path), 137).status == 0
    assert judge(str(tmp_path), 0).finished


def test_an_unfinished_run_is_never_0(tmp_path):
    assert "does the script call ftmpi.init()" in judge(str(tmp_path), 0).cause
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "summary.json").write_text(json.dumps({"finished": False}))
    outcome = judge(str(tmp_path), 0)
    assert outcome.status == UNFINISHED and "before its workers finished" in outcome.cause
    assert judge(str(tmp_path), 137).status == 137 and judge(str(tmp_path), 137).retryable
    assert judge(str(tmp_path), -9).status == 137


def test_a_lost_node_is_named(tmp_path):
    outcome = judge(str(tmp_path), 0, NODE_DIED.splitlines(True))
    assert outcome.status == NODE_LOST and "node n3 was lost" in outcome.cause
    assert outcome.nodes == ("n3",)  # what the relaunch leaves out (launch.nodes)
    assert outcome.retryable


def test_a_rank_that_raised_is_named_and_bad_input_is_not_retried(tmp_path):
    fatal = {"rank": 1, "role": "worker 1", "type": "ValueError", "message": "bug", "time": 5.0}
    (tmp_path / "fatal.json").write_text(json.dumps(fatal))
    outcome = judge(str(tmp_path), 1, since=1.0)
    assert outcome.status == 1 and outcome.cause == "worker 1 (rank 1) raised ValueError: bug"
    assert judge(str(tmp_path), 1, since=9.0).status == 1  # an earlier attempt's error: not it
    assert "raised" not in judge(str(tmp_path), 1, since=9.0).cause
    (tmp_path / "fatal.json").write_text(json.dumps({**fatal, "user_error": True}))
    assert judge(str(tmp_path), 2, since=1.0).status == 2
    assert not judge(str(tmp_path), 2, since=1.0).retryable
    (tmp_path / "fatal.json").write_text(json.dumps({**fatal, "type": "CommTimeout"}))
    assert judge(str(tmp_path), 1, since=1.0).status == 5


def test_an_interruption_is_named_and_not_retried(tmp_path):
    outcome = judge(str(tmp_path), 0, signal_name="SIGTERM")
    assert outcome.status == 143 and "SIGTERM" in outcome.cause and not outcome.retryable
    assert judge(str(tmp_path), 0, signal_name="SIGHUP").status == 129


def _filtered(text: str, *, fatal: bool = False) -> tuple[str, str]:
    log = io.StringIO()
    handled: set[int] = set()
    f = OutputFilter(log, threading.Lock(), handled=handled, fatal=lambda: fatal)
    shown = "".join(f.feed(line) for line in text.splitlines(True)) + f.flush()
    return shown, log.getvalue()


def test_recovery_noise_goes_to_the_log_and_the_rest_is_shown():
    text = (
        "ftmpi: injected failure: server:0@step=40 (step 40) (pid 6633)\n"
        "NBC_Progress: an error 77 was found during schedule 0x55 at row-offset 0 - aborting\n"
        "\n"
        "--------------------------------------------------------------------------\n"
        "prterun noticed that process rank 0 with PID 6633 on node vm exited on\n"
        "signal 9 (Killed).\n"
        "--------------------------------------------------------------------------\n"
        "ftmpi: server 0 died; recovering with strategy chain, 2 worker(s) left\n"
        "--------------------------------------------------------------------------\n"
        "prterun noticed that process rank 1 with PID 777 on node vm exited on\n"
        "signal 9 (Killed).\n"
        "--------------------------------------------------------------------------\n"
        "[1,0]<stderr>: PMIX ERROR: PMIX_ERROR in file pmix_server_dyn.c at line 1113\n"
        "an ordinary line\n"
    )
    shown, log = _filtered(text)
    assert log == text
    assert "NBC_Progress" not in shown and "PMIX ERROR" not in shown
    assert "PID 6633" not in shown  # the replaced rank ftmpi killed
    assert "PID 777" in shown  # a rank nobody said ftmpi handled
    assert "ftmpi: server 0 died" in shown and shown.endswith("an ordinary line\n")
    assert "\n\n" not in shown


def test_the_abort_banner_is_shown_unless_a_rank_raised():
    banner = (
        "------------------------------------------------------------------\n"
        "MPI_ABORT was invoked on rank 1 in communicator MPI COMM 3 DUP FROM 0\n"
        "------------------------------------------------------------------\n"
        " \n"
    )
    assert _filtered(banner, fatal=True)[0] == ""
    assert "MPI_ABORT" in _filtered(banner, fatal=False)[0]


def test_an_unclosed_banner_is_shown_at_the_end():
    text = "------------------------------\nsomething Open MPI says\n"
    assert _filtered(text)[0] == text


def test_asking_whether_a_run_finished_imports_no_torch():
    """The Slurm scripts ask launch.rundir whether a run finished between a checkpoint and the
    requeue: that must not cost torch's import (over a second)."""
    import subprocess
    import sys

    code = "import sys, launch.rundir; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
