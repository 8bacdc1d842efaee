"""Console logging of the Flower apps: every record printed once."""

from __future__ import annotations

import logging

CEDAR_LOGGERS = ("clients", "common", "server", "strategies")


def configure_logging(level: int = logging.INFO) -> None:
    """Print every record once, through Flower's console handler.

    Flower's ``flwr`` logger has its own handler and also propagates to the root logger, so any
    root handler (``logging.basicConfig``, or one a library adds) prints each Flower record a second
    time. Here cedar's loggers write through Flower's handler (the one ``flwr run`` streams) and,
    like ``flwr``, stop propagating; the root logger keeps its handlers for third-party records.
    Both the ServerApp and the ClientApp call it (idempotent).
    """
    from flwr.common.logger import FLOWER_LOGGER, console_handler

    FLOWER_LOGGER.propagate = False
    for name in CEDAR_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = False
        if console_handler not in logger.handlers:
            logger.addHandler(console_handler)
    logging.getLogger("httpx").setLevel(logging.WARNING)
