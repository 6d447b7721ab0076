"""Progress a person can follow: a bar per training epoch with its running MAE, a line per finished epoch.

Training runs in Ray Train workers, whose output goes to Ray's logs, not the terminal, unless the
job is verbose. Rank 0 therefore sends small events through a Ray queue, and the driver draws them:

    with EpochProgress(epochs=5) as progress:        # on the driver
        trainer = make_trainer(..., progress=progress.queue)
        trainer.fit()

    send(queue, {"kind": "step", ...})               # in the worker (see ray_jobs.train)
"""

from __future__ import annotations

import contextlib
import queue as std_queue
import sys
import threading
from types import TracebackType
from typing import Any

from ray.util.queue import Queue
from tqdm.auto import tqdm


def send(progress: Queue | None, event: dict[str, Any]) -> None:
    """Hand an event to the driver; progress is never worth failing or slowing a training step for."""
    if progress is None:
        return
    with contextlib.suppress(Exception):  # a full or closed queue: drop the event
        progress.put_nowait(event)


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    """One finished epoch as a line of text.

    >>> epoch_line({"epoch": 1, "train_mae": 5.81, "val_mae": 5.324, "val_cs5": 0.581,
    ...             "epoch_seconds": 132.4, "best_val_mae": 5.324}, 5)
    'epoch 2/5  train MAE 5.81  val MAE 5.32  CS@5 58.1%  132 s  (best)'
    """
    best = "  (best)" if row["val_mae"] <= row.get("best_val_mae", row["val_mae"]) else ""
    return (f"epoch {row['epoch'] + 1}/{epochs}  train MAE {row['train_mae']:.2f}  val MAE {row['val_mae']:.2f}  "
            f"CS@5 {100 * row['val_cs5']:.1f}%  {row['epoch_seconds']:.0f} s{best}")


class EpochProgress:
    """Draws the events of ``send`` on the driver while training runs (a thread reading the queue)."""

    def __init__(self, epochs: int, stream: Any = None) -> None:
        self.epochs = epochs
        self.stream = stream or sys.stderr
        self.queue = Queue(maxsize=1000, actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="epoch-progress", daemon=True)
        self._bar: tqdm | None = None

    def __enter__(self) -> EpochProgress:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._drain()
        self._close_bar()
        self.queue.shutdown()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.handle(self.queue.get(timeout=0.5))
            except std_queue.Empty:
                continue
            except Exception:  # the queue actor is gone (Ray shut down): nothing more to draw
                return

    def _drain(self) -> None:
        with contextlib.suppress(Exception):
            while not self.queue.empty():
                self.handle(self.queue.get_nowait())

    def handle(self, event: dict[str, Any]) -> None:
        if event["kind"] == "step":
            if self._bar is None:
                self._bar = tqdm(total=event["steps"], desc=f"epoch {event['epoch'] + 1}/{self.epochs}",
                                 unit="step", file=self.stream, leave=False, dynamic_ncols=True,
                                 disable=not getattr(self.stream, "isatty", lambda: False)())
            self._bar.n = min(event["step"], self._bar.total)
            self._bar.set_postfix_str(f"train MAE {event['train_mae']:.2f}", refresh=True)
        elif event["kind"] == "epoch":
            self._close_bar()
            print(epoch_line(event["row"], self.epochs), file=self.stream, flush=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
