"""A request's pipeline run on the event loop: what an ``asyncio.Task`` does for it, for less.

Per request, an ``asyncio.Task`` costs about 5k instructions in CPython 3.11 beyond the
coroutine it runs (``bench/callgrind.py``): its registration in asyncio's WeakSet of all tasks
(a Python-level call, and another when it is freed), the current-task map entered and left at
each step, its result kept in a future, and a done callback scheduled through the loop.
:class:`RequestTask` steps the coroutine itself, as ``Task`` does: the first step on the next
loop iteration, each further step once the future it waits for is done, a cancellation thrown
in where it waits. It is awaitable, so the server's shutdown can ``cancel()`` it, ask
``done()`` and ``asyncio.wait`` for it as for a Task.

What it leaves out, on purpose: it is not the *current task* (``asyncio.current_task()`` is
None inside), so code that needs one (``asyncio.timeout``, a ``TaskGroup``, a client library's
own time-outs) must run in a Task of its own, as the pipeline's outbox hook does; it keeps no
cancellation count (``cancelling``/``uncancel``), which only such code reads; and it keeps no
result: an exception the coroutine lets out goes to the loop's exception handler at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any, Protocol

__all__ = ["RequestTask", "Tracker"]


class Tracker(Protocol):
    """Who keeps the request tasks still running (the server, for its shutdown)."""

    tasks: set[Any]  # a task is in it until it ends
    idle_event: asyncio.Event | None  # set whenever a task ends, while someone waits for that


class RequestTask:
    """Runs one request's coroutine to its end, then leaves ``tracker.tasks``.

    Ending also sets ``tracker.idle_event`` (a waiting shutdown), as ``Server.task_done`` does
    for a Task.
    """

    __slots__ = ("_cancelled", "_coro", "_ended", "_loop", "_throw", "_tracker", "_waiting")

    def __init__(
        self,
        coro: Coroutine[Any, Any, None],
        loop: asyncio.AbstractEventLoop,
        tracker: Tracker,
    ) -> None:
        self._coro: Coroutine[Any, Any, None] | None = coro  # None once it has ended
        self._loop = loop
        self._tracker = tracker
        self._waiting: asyncio.Future[Any] | None = None  # what the coroutine waits for
        self._throw: BaseException | None = None  # thrown in at the next step instead
        self._ended: asyncio.Future[None] | None = None  # made for whoever awaits the end
        self._cancelled = False  # it ended by letting a CancelledError out
        loop.call_soon(self._step)

    def done(self) -> bool:
        """Whether the coroutine has ended."""
        return self._coro is None

    def cancelled(self) -> bool:
        """Whether it ended by letting a ``CancelledError`` out (as a cancelled Task)."""
        return self._cancelled

    def cancel(self, msg: Any | None = None) -> bool:
        """Cancel the run: a ``CancelledError`` is raised where the coroutine waits.

        As ``Task.cancel``: the future it waits for is cancelled (which wakes it with the
        error), or, with none to cancel, the error is thrown in at its next step. The
        coroutine may still catch it; False if the run has ended already.
        """
        if self._coro is None:
            return False
        waiting = self._waiting
        if waiting is not None and waiting.cancel(msg):
            return True
        self._throw = asyncio.CancelledError() if msg is None else asyncio.CancelledError(msg)
        return True

    def __await__(self) -> Generator[Any, None, None]:
        """Wait for the end (``asyncio.wait`` on a shutdown); never raises the coroutine's error."""
        if self._coro is not None:
            if self._ended is None:
                self._ended = self._loop.create_future()
            yield from self._ended

    def _step(self, _: object = None) -> None:
        """Run the coroutine up to its next wait or its end (``_``: the future waited for)."""
        coro = self._coro
        assert coro is not None
        self._waiting = None
        throw = self._throw
        error = None
        try:
            if throw is None:
                waiting = coro.send(None)
            else:
                self._throw = None
                waiting = coro.throw(throw)
        except StopIteration:
            pass
        except asyncio.CancelledError:
            self._cancelled = True
        except BaseException as exc:
            error = exc
        else:
            # What Task does with what its coroutine yields.
            if getattr(waiting, "_asyncio_future_blocking", None):  # an awaited future
                waiting._asyncio_future_blocking = False
                waiting.add_done_callback(self._step)
                self._waiting = waiting
                throw = self._throw  # cancel() called during this very step
                if throw is not None and waiting.cancel(*throw.args):
                    self._throw = None  # the wake-up carries it
            elif waiting is None:  # a bare yield (asyncio.sleep(0)): on the next iteration
                self._loop.call_soon(self._step)
            else:
                self._throw = RuntimeError(f"RequestTask got bad yield: {waiting!r}")
                self._loop.call_soon(self._step)
            return
        self._coro = None
        if self._ended is not None:
            self._ended.set_result(None)
        # What Server.task_done does for a Task, inline (a call fewer per request).
        tracker = self._tracker
        tracker.tasks.discard(self)
        if tracker.idle_event is not None:
            tracker.idle_event.set()
        if isinstance(error, KeyboardInterrupt | SystemExit):
            raise error  # as from a Task: out of the loop
        if error is not None:  # a Task would log it once collected, never retrieved
            self._loop.call_exception_handler(
                {"message": "Unhandled error in a request's task", "exception": error, "task": self}
            )
