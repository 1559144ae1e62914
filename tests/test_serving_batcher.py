"""worker/serving/batcher.py on its own: concurrent requests share forward passes and
each gets its own rows back; a full queue refuses at once; batching off runs each
request alone under the same limit; a failing pass fails each of its requests."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from worker.serving.batcher import Batcher, QueueFull


def slow_double(delay_s: float = 0.0):  # type: ignore[no-untyped-def]
    passes: list[int] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        passes.append(x.shape[0])
        time.sleep(delay_s)
        return x * 2

    return forward, passes


def test_concurrent_requests_share_a_pass_and_get_their_own_rows() -> None:
    forward, passes = slow_double()
    batcher = Batcher(forward, max_batch=64, max_wait_s=0.2, queue_limit=100)
    results: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(10)

    def one(i: int) -> None:
        barrier.wait()
        results[i] = batcher.submit(torch.full((i % 3 + 1, 2), float(i)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    for i, out in results.items():
        assert torch.equal(out, torch.full((i % 3 + 1, 2), 2.0 * i)), i
    assert sum(passes) == sum(i % 3 + 1 for i in range(10))
    assert len(passes) < 10 and max(passes) > 1, passes


def test_a_pass_takes_at_most_max_batch_rows_and_a_large_request_runs_alone() -> None:
    forward, passes = slow_double(0.05)
    batcher = Batcher(forward, max_batch=4, max_wait_s=0.05, queue_limit=100)
    threads = [threading.Thread(target=batcher.submit, args=(torch.ones(n, 1),))
               for n in (3, 3, 9, 1)]  # fmt: skip
    for t in threads:
        t.start()
        time.sleep(0.005)
    for t in threads:
        t.join()
    batcher.close()
    assert sorted(passes) == [3, 4, 9] or sorted(passes) == [1, 3, 3, 9], passes
    assert all(p <= 4 for p in passes if p != 9)


def test_a_full_queue_refuses_at_once() -> None:
    forward, _ = slow_double()
    batcher = Batcher(forward, max_batch=64, max_wait_s=1.0, queue_limit=1)
    waiting = threading.Thread(target=batcher.submit, args=(torch.ones(1, 1),))
    waiting.start()
    time.sleep(0.1)
    started = time.monotonic()
    with pytest.raises(QueueFull):
        batcher.submit(torch.ones(1, 1))
    assert time.monotonic() - started < 0.1
    waiting.join()
    batcher.close()


def test_batching_off_runs_each_request_alone_under_the_same_limit() -> None:
    forward, passes = slow_double(0.2)
    batcher = Batcher(forward, max_batch=64, max_wait_s=1.0, queue_limit=1, enabled=False)
    busy = threading.Thread(target=batcher.submit, args=(torch.ones(2, 1),))
    busy.start()
    time.sleep(0.05)
    with pytest.raises(QueueFull):
        batcher.submit(torch.ones(1, 1))
    busy.join()
    assert torch.equal(batcher.submit(torch.ones(1, 1)), torch.full((1, 1), 2.0))
    assert passes == [2, 1]


def test_a_failing_pass_fails_each_of_its_requests() -> None:
    def broken(_x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    batcher = Batcher(broken, max_batch=8, max_wait_s=0.0, queue_limit=8)
    with pytest.raises(RuntimeError, match="boom"):
        batcher.submit(torch.ones(1, 1))
    batcher.close()
