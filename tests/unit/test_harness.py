"""The test harness retries a launch only when Open MPI's runtime never started."""

from tests.conftest import MPIResult, runtime_failed_to_start

LISTENER = "----\nThe PMIx server's listener thread failed to start. We cannot\ncontinue.\n----\n"


def test_runtime_start_failure_is_recognised() -> None:
    assert runtime_failed_to_start(MPIResult(213, "", LISTENER))


def test_a_job_that_ran_or_succeeded_is_not_retried() -> None:
    assert not runtime_failed_to_start(MPIResult(213, '{"step": 1}\n', LISTENER))
    assert not runtime_failed_to_start(MPIResult(0, "", LISTENER))
    assert not runtime_failed_to_start(MPIResult(1, "", "Traceback ...\nValueError: x\n"))
