"""Training batches built ahead of the step by a background worker.

The worker thread runs the batch pipeline (the shuffled order, reading images from memory or the
memory-mapped cache, the crop and normalisation, the copy to the device) up to ``depth`` batches
ahead, so that the training step does not wait for it: on a GPU the step and the next batch's
data work overlap, on a CPU they use the cores the model leaves idle. One worker keeps the random
draws (order, crops) in the same sequence as building them inline, so results are identical.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_DONE = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def prefetched(items: Iterable[T], depth: int) -> Iterator[T]:
    """``items`` in order, each computed by a background thread up to ``depth`` ahead of the
    consumer (``depth`` 0: computed inline). An exception in the worker is raised here, at the
    item it happened on; a consumer that stops early stops the worker."""
    if depth <= 0:
        yield from items
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(value) -> bool:
        """Put ``value`` once there is room; False once the consumer has gone."""
        while not stop.is_set():
            try:
                ready.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
        except BaseException as error:  # noqa: BLE001 (handed to the consumer, raised there)
            offer(_Failed(error))
            return
        offer(_DONE)

    worker = threading.Thread(target=work, name="rsnc-batches", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        worker.join()
