"""PreemptionHandler in one process (the 2-rank agreement is in test_checkpoint.py's worker,
the end-to-end stop and exit code in test_checkpoint_e2e.py)."""

import os
import signal

import pytest

from fms_bamba.preemption import EXIT_PREEMPTED, PreemptionHandler


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_signal_requests_a_stop_and_close_restores_the_handlers(signum):
    before = signal.getsignal(signum)
    handler = PreemptionHandler()
    try:
        assert not handler.stop_requested()
        os.kill(os.getpid(), signum)
        assert handler.stop_requested()
        assert handler.stop_requested()  # stays requested
    finally:
        handler.close()
    assert signal.getsignal(signum) is before


def test_second_ctrl_c_stops_at_once():
    handler = PreemptionHandler()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        handler.close()


def test_sigint_is_left_to_the_launcher_when_there_are_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    before = signal.getsignal(signal.SIGINT)
    handler = PreemptionHandler()
    try:
        assert signal.getsignal(signal.SIGINT) is before
        assert signal.SIGINT not in handler.signals
    finally:
        handler.close()


def test_exit_code_is_distinct_from_errors_and_signal_deaths():
    assert EXIT_PREEMPTED not in (0, 1, 2) and EXIT_PREEMPTED < 128
