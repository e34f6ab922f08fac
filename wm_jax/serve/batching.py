"""Queued /act requests run as one `Model.act` call (Batcher)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from wm_jax.serve.model import Model




@dataclass
class Pending:
    carry: tuple[np.ndarray, np.ndarray]
    obs: np.ndarray
    future: asyncio.Future


class Unavailable(RuntimeError):
    """The batcher is stopped (shutting down) or its loop has died: the request cannot be served."""


class Batcher:
    """Runs queued /act requests as one `Model.act` call on its own worker thread: every request
    that queued while the previous call ran (up to the largest bucket), and with `window` > 0 also
    those that arrive within `window` seconds of the first. A lone request never waits. `drain`
    (shutdown begins) ends a window being waited out: the batch in hand runs at once, and later
    ones take no window. When it stops, or its loop dies, every waiting request fails with
    Unavailable (never hangs)."""

    def __init__(self, model: Model, window: float) -> None:
        self.model = model
        self.window = window
        self.max = model.settings.buckets[-1]
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.batches = 0  # calls made
        self.batched = 0  # requests they carried
        self.error: BaseException | None = None  # why the loop ended, once it has
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="wm_jax-act")
        self._task: asyncio.Task | None = None
        self._stopped = False
        self._draining = asyncio.Event()

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stopped

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.error = task.exception()
        self._fail_queued()

    def _fail_queued(self) -> None:
        while not self.queue.empty():
            p = self.queue.get_nowait()
            if not p.future.done():
                p.future.set_exception(Unavailable("the server is shutting down" if self._stopped
                                                   else f"the batcher stopped: {self.error!r}"))

    def drain(self) -> None:
        """Shutdown begins: answer what is queued now instead of at the end of a window (the server
        waits for in-flight requests before it stops the batcher). Call it on the batcher's loop."""
        self.window = 0.0
        self._draining.set()

    async def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._fail_queued()
        self._pool.shutdown(wait=False)

    async def submit(self, carry: tuple[np.ndarray, np.ndarray], obs: np.ndarray) -> dict[str, Any]:
        if not self.alive:
            raise Unavailable("the server is shutting down" if self._stopped else f"the batcher stopped: {self.error!r}")
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(Pending(carry, obs, future))
        return await future

    async def _wait_for_one(self, batch: list[Pending], left: float) -> bool:
        """Up to `left` seconds for one more request, appended to `batch`; False when the time ran
        out or `drain` was called first (a request that arrived meanwhile stays queued)."""
        get = asyncio.ensure_future(self.queue.get())
        drained = asyncio.ensure_future(self._draining.wait())
        got = False
        try:
            await asyncio.wait((get, drained), timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when stop() cancels the wait: a request taken off the queue joins the batch
            drained.cancel()
            if get.done() and not get.cancelled():
                batch.append(get.result())
                got = True
            else:
                get.cancel()  # a cancelled get leaves the queue as it was
        return got

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            try:
                deadline = loop.time() + self.window
                while len(batch) < self.max:
                    if not self.queue.empty():
                        batch.append(self.queue.get_nowait())
                        continue
                    left = deadline - loop.time()
                    if left <= 0 or self._draining.is_set():
                        break
                    if not await self._wait_for_one(batch, left):
                        break
                self.batches += 1
                self.batched += len(batch)
                try:
                    rows = await loop.run_in_executor(self._pool, self.model.act, [p.carry for p in batch],
                                                      [p.obs for p in batch])
                # any error of the model call goes to the batch's requests; the loop lives on
                except Exception as e:  # noqa: BLE001
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(e)
                    continue
                for p, row in zip(batch, rows):
                    if not p.future.done():
                        p.future.set_result(row)
            except BaseException:  # cancelled (stop) or dying: the batch in hand must not hang
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(Unavailable("the server is shutting down"))
                raise
