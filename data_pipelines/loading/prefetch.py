"""A background thread that keeps a few batches ready, each with the loader state after it.

The training loop consumes batches from :class:`Prefetcher`; a checkpoint stores
:attr:`Prefetcher.state`, the loader state after the last batch the loop *consumed* (not after
the ones prefetched), so resume continues exactly there.
"""

from __future__ import annotations

import queue
import threading

from pretrain.errors import UserError


class Prefetcher:
    """Pulls batches from ``loader`` in a thread, ``depth`` ahead of the loop.

    The loader's state is captured right after each batch is produced, in the same thread, and
    travels with the batch; :attr:`state` is the state *after the last batch the loop consumed*,
    which is what a checkpoint must store (not the state of the prefetched ones).
    """

    _DONE = object()

    def __init__(self, loader, depth: int = 4):
        self.loader = loader
        self.state: dict | None = loader.state_dict()
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for batch in self.loader:
                item = (batch, self.loader.state_dict())
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._q.put((self._DONE, None))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consuming thread
            self._q.put((e, None))

    def next(self) -> dict:
        item, state = self._q.get()
        if item is self._DONE:
            raise UserError("the training loader ended; it must be endless (data.sources yielded no more batches)")
        if isinstance(item, BaseException):
            raise item
        self.state = state
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        close = getattr(self.loader, "close", None)  # DataLoader worker processes
        if close is not None and not self._thread.is_alive():
            close()
