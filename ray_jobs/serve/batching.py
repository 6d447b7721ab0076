"""Forward passes shared by concurrent requests (``@serve.batch``), with a wait sized to the running pass."""

# No `from __future__ import annotations`: Serve's batch decorator inspects the method at runtime.
import asyncio
import time
from collections.abc import Callable

import numpy as np
from ray import serve

from agecore.predictor import Predictor
from ray_jobs.serve.schema import BATCH_SIZE


class SharedForward:
    """Ages of single preprocessed images, with one forward pass for the requests of a batch (``@serve.batch``).

    Serve forms the next batch as soon as its wait is over and queues it behind the running one, so
    with no wait every request under load would be a batch of its own. So a request that opens a
    batch lets it wait until the running pass should end (from the average time an image has
    taken), gathering what arrives meanwhile; when none runs, it waits for nothing and goes to the
    model at once. ``on_batch`` is told each batch's size (the service's metrics).
    """

    def __init__(self, predictor: Predictor, on_batch: Callable[[int], None] | None = None) -> None:
        self.predictor = predictor
        self.on_batch = on_batch
        self.seconds_per_image = 0.0  # of the forward pass: a running average over batches
        self.busy_until = 0.0  # when the running pass should end (perf_counter); 0 when none runs

    async def __call__(self, image: np.ndarray) -> float:
        self._batch.set_batch_wait_timeout_s(max(0.0, self.busy_until - time.perf_counter()))
        return await self._batch(image)

    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=0.0)
    async def _batch(self, images: list[np.ndarray]) -> list[float]:
        if self.on_batch:
            self.on_batch(len(images))
        start = time.perf_counter()
        self.busy_until = start + len(images) * self.seconds_per_image
        try:
            ages = await asyncio.get_running_loop().run_in_executor(
                None, self.predictor.predict_arrays, np.stack(images))
        finally:
            self.busy_until = 0.0
        per_image = (time.perf_counter() - start) / len(images)
        self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * per_image if self.seconds_per_image else per_image
        return [float(a) for a in ages]

