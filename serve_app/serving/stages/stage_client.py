"""One way to call a stage, whether it is a Ray Serve `DeploymentHandle` or a plain async object (tests' fakes).

- `await client.call("vocode", job)`        Ray: `await handle.vocode.remote(job)`; fake: `await fake.vocode(job)`.
- `client.stream("generate", job)`          Ray: `handle.options(stream=True).generate.remote(job)`;
                                            fake: `fake.generate(job)` (an async generator).
  Both give a `StageStream`: an async iterator with `aclose()`, which cancels the downstream request (Ray:
  `DeploymentResponseGenerator.cancel()`, which frees the T3 engine slot; fake: `aclose()` on the generator).
  Both run ahead of the reader (a fake's generator is pumped by a task, as a Ray replica runs on its own).
"""
from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any

try:
    from ray.serve.handle import DeploymentHandle
except ImportError:  # pragma: no cover
    DeploymentHandle = None  # type: ignore[assignment,misc]


def is_ray_handle(handle: Any) -> bool:
    return DeploymentHandle is not None and isinstance(handle, DeploymentHandle)


class StageStream:
    """A stage's response stream; `aclose()` cancels the downstream work and is safe to call twice.

    Like a Ray Serve streaming call, which runs in its replica whether or not the caller is reading yet, a plain
    async generator (tests' fakes) is pumped eagerly by a task into a queue."""

    _END = object()

    def __init__(self, source: Any, *, is_ray: bool):
        self._source = source
        self._is_ray = is_ray
        self._closed = False
        if is_ray:
            self._iter = source.__aiter__()
        else:
            self._queue: asyncio.Queue = asyncio.Queue()
            self._pump = asyncio.ensure_future(self._run_pump())

    async def _run_pump(self) -> None:
        try:
            async for item in self._source:
                self._queue.put_nowait(item)
            self._queue.put_nowait(self._END)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - re-raised to the reader
            self._queue.put_nowait(exc)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        if self._is_ray:
            try:
                return await self._iter.__anext__()
            except StopAsyncIteration:
                self._closed = True  # ran to its end: nothing left to cancel
                raise
        item = await self._queue.get()
        if item is self._END:
            self._closed = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._closed = True
            raise item
        return item

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._is_ray:
            self._source.cancel()
            return
        self._pump.cancel()
        await asyncio.gather(self._pump, return_exceptions=True)
        if hasattr(self._source, "aclose"):
            await self._source.aclose()


class StageClient:
    def __init__(self, handle: Any, name: str):
        self.handle = handle
        self.name = name
        self.is_ray = is_ray_handle(handle)

    async def call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        if self.is_ray:
            response = getattr(self.handle, method).remote(*args)
            if timeout_s is None:
                return await response
            task = asyncio.ensure_future(_await(response))
            try:
                return await asyncio.wait_for(asyncio.shield(task), timeout_s)
            except asyncio.TimeoutError:
                response.cancel()
                task.add_done_callback(_retrieve)   # its RequestCancelledError is expected, not "never retrieved"
                raise
        result = getattr(self.handle, method)(*args)
        if inspect.isawaitable(result):
            return await (asyncio.wait_for(result, timeout_s) if timeout_s else result)
        return result

    def stream(self, method: str, *args: Any) -> StageStream:
        if self.is_ray:
            return StageStream(getattr(self.handle.options(stream=True), method).remote(*args), is_ray=True)
        return StageStream(getattr(self.handle, method)(*args), is_ray=False)


async def _await(response: Any) -> Any:
    return await response


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()
