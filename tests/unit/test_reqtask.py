"""RequestTask: a request's coroutine stepped like an asyncio.Task, cancelled and awaited like one."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.reqtask import RequestTask


class Tracker:
    """What the server is to its request tasks: the set of those running, an event set at each end."""

    def __init__(self) -> None:
        self.tasks: set[Any] = set()
        self.idle_event: asyncio.Event | None = asyncio.Event()

    def ended(self, task: RequestTask) -> bool:
        """The task has ended, left the set and woken the event."""
        assert self.idle_event is not None
        return task.done() and task not in self.tasks and self.idle_event.is_set()


def start(coro: Any) -> tuple[RequestTask, Tracker]:
    """A RequestTask on the running loop, tracked."""
    tracker = Tracker()
    task = RequestTask(coro, asyncio.get_running_loop(), tracker)
    tracker.tasks.add(task)
    return task, tracker


async def test_runs_on_the_next_iteration_to_its_end() -> None:
    """The first step is not run by the constructor; the coroutine runs through its awaits; on_done once."""
    steps: list[str] = []
    fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def body() -> None:
        steps.append("start")
        steps.append(await fut)
        await asyncio.sleep(0)  # a bare yield
        await asyncio.sleep(0.001)
        steps.append("end")

    task, tracker = start(body())
    assert steps == [] and not task.done()
    await asyncio.sleep(0)
    assert steps == ["start"]
    assert tracker.idle_event is not None and not tracker.idle_event.is_set() and task in tracker.tasks
    fut.set_result("woken")
    await asyncio.wait([asyncio.ensure_future(task)], timeout=5.0)
    assert steps == ["start", "woken", "end"]
    assert task.done() and not task.cancelled() and tracker.ended(task)


async def test_a_future_error_is_raised_where_it_is_awaited() -> None:
    """The coroutine sees the exception of the future it waits for, and may handle it."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    seen: list[BaseException] = []

    async def body() -> None:
        try:
            await fut
        except ValueError as exc:
            seen.append(exc)

    task, tracker = start(body())
    await asyncio.sleep(0)
    fut.set_exception(ValueError("boom"))
    await task
    assert [str(e) for e in seen] == ["boom"] and tracker.ended(task) and not task.cancelled()


async def test_cancel_raises_where_it_waits_and_ends_cancelled() -> None:
    """cancel() cancels the awaited future; a CancelledError let out ends the run as cancelled."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    answered: list[str] = []

    async def body() -> None:
        try:
            await fut
        except asyncio.CancelledError:
            answered.append("shutting down")
            raise

    task, tracker = start(body())
    await asyncio.sleep(0)
    assert task.cancel() and fut.cancelled()
    await task
    assert answered == ["shutting down"] and task.cancelled() and tracker.ended(task)
    assert not task.cancel()  # ended already


async def test_cancel_before_the_first_step_never_runs_the_body() -> None:
    """Like a Task cancelled before it started: the coroutine's body never runs."""
    ran: list[bool] = []

    async def body() -> None:
        ran.append(True)

    task, tracker = start(body())
    assert task.cancel()
    await asyncio.sleep(0)
    assert ran == [] and task.cancelled() and tracker.ended(task)


async def test_cancel_while_its_wake_up_is_scheduled_is_thrown_in_next() -> None:
    """A future done but its wake-up not yet run cannot be cancelled: the error comes at the next step."""
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    seen: list[str] = []

    async def body() -> None:
        try:
            await fut
            seen.append("resumed")
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    task, _ = start(body())
    await asyncio.sleep(0)
    fut.set_result(1)
    assert task.cancel()
    await task
    assert seen == ["cancelled"] and task.cancelled()


async def test_a_caught_cancellation_lets_the_coroutine_finish() -> None:
    """The coroutine may catch the CancelledError and go on; the run then ends normally."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def body() -> None:
        try:
            await fut
        except asyncio.CancelledError:
            await asyncio.sleep(0)

    task, tracker = start(body())
    await asyncio.sleep(0)
    task.cancel()
    await task
    assert not task.cancelled() and tracker.ended(task)


async def test_an_error_let_out_goes_to_the_loop_exception_handler() -> None:
    """An exception out of the coroutine ends the run and is reported, not lost."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))

    async def body() -> None:
        raise RuntimeError("a bug")

    task, tracker = start(body())
    await task
    loop.set_exception_handler(None)
    assert tracker.ended(task) and not task.cancelled()
    assert [str(c["exception"]) for c in reported] == ["a bug"] and reported[0]["task"] is task


async def test_a_yield_that_is_no_future_is_an_error_in_the_coroutine() -> None:
    """As in a Task, yielding something else than a future raises RuntimeError inside."""

    class Bad:
        def __await__(self) -> Any:
            yield "not a future"

    seen: list[str] = []

    async def body() -> None:
        with pytest.raises(RuntimeError, match="bad yield"):
            await Bad()
        seen.append("raised")

    task, tracker = start(body())
    tracker.idle_event = None  # no shutdown waiting: the end only leaves the set
    await task
    assert seen == ["raised"] and task.done() and not tracker.tasks
