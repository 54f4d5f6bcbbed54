"""A per-test time limit for pytest where pytest-timeout is not installed (benchmarks/gpu_check.sh).

Loaded with ``-p gpu_check_timeout`` and ``GPU_CHECK_TEST_TIMEOUT=seconds``: SIGALRM fails the
setup, call or teardown that runs longer than the limit, and the run goes on with the next test,
so one hung test cannot take the whole stage (and its summary) with it.
"""
import os
import signal

import pytest

LIMIT = float(os.environ.get("GPU_CHECK_TEST_TIMEOUT", "0") or 0)


def _expire(signum, frame):
    pytest.fail(f"over the per-test limit of {LIMIT:g} s (GPU_CHECK_TEST_TIMEOUT)")


def _limited():
    if LIMIT <= 0 or not hasattr(signal, "setitimer"):
        yield
        return
    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, LIMIT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from _limited()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _limited()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    yield from _limited()
