"""What every job shares: logging and connecting to (or starting) Ray."""

from __future__ import annotations

import logging
import os

import ray


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def init_ray(address: str | None = None) -> None:
    """Connect to ``address`` or ``RAY_ADDRESS``; with neither, start a local Ray on this machine.

    A local Ray keeps its dashboard on 127.0.0.1: nothing is exposed beyond this host.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(dashboard_host="127.0.0.1", include_dashboard=False, log_to_driver=True)
    logging.getLogger(__name__).info("Ray resources: %s", ray.cluster_resources())
