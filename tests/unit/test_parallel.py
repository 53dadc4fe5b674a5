"""fabula.parallel: every failure named once, in one error."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from fabula.errors import FabulaError
from fabula.parallel import at_once, results


def test_results_in_order_and_all_run_at_once():
    barrier = threading.Barrier(3, timeout=5)   # would time out if they ran one after another

    def work(n: int) -> int:
        barrier.wait()
        return n * 2

    assert at_once([1, 2, 3], work) == [2, 4, 6]


def test_one_failure_is_raised_as_it_is():
    def work(n: int) -> int:
        if n == 2:
            raise FabulaError("two is broken", "fix two")
        return n

    with pytest.raises(FabulaError) as caught:
        at_once([1, 2, 3], work)
    assert str(caught.value) == "two is broken\n  fix: fix two"


def test_several_failures_each_named_once_with_the_hint():
    def work(name: str) -> None:
        raise FabulaError(f"{name} does not answer")

    with pytest.raises(FabulaError) as caught:
        at_once(["web1", "db1"], work, name=str.upper, hint="fix each host")
    assert caught.value.message == "WEB1: web1 does not answer\nDB1: db1 does not answer"
    assert caught.value.hint == "fix each host"


def test_a_job_that_waited_on_a_failed_one_does_not_repeat_its_error():
    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = pool.submit(lambda: (_ for _ in ()).throw(FabulaError("the databases failed")))
        waiting = pool.submit(failed.result)
    with pytest.raises(FabulaError) as caught:
        results([failed, waiting])
    assert str(caught.value) == "the databases failed"
