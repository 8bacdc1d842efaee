"""Weights & Biases tracking, one step per round; ``wandb`` is imported only when enabled.

Modes: ``off``; ``offline`` (default: files under the run folder, sync later
with ``wandb sync``); ``online`` (needs ``WANDB_API_KEY`` or ``wandb login``).
``WANDB_MODE=disabled`` in the environment turns it off (the tests do this).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, mode: str, project: str, run_dir: Path, config: dict[str, Any], name: str):
        self.run = None
        if os.environ.get("WANDB_MODE") == "disabled":
            mode = "off"
        if mode == "off":
            return
        import wandb

        self.run = wandb.init(project=project, name=name, dir=str(run_dir), config=config, mode=mode,
                              settings=wandb.Settings(silent=True, console="off"))
        log.info("W&B run %s (%s) in %s", self.run.id, mode, run_dir)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def image(self, key: str, path: Path, step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))}, step=step)

    def report(self, images: dict[str, bytes], tables: dict[str, tuple[list[str], list[list[Any]]]]) -> None:
        """The run report's figures (PNG bytes) and tables, under ``report/<key>``."""
        if self.run is not None:
            import io

            import wandb
            from PIL import Image

            data = {f"report/{k}": wandb.Image(Image.open(io.BytesIO(v))) for k, v in images.items()}
            data.update({f"report/{k}": wandb.Table(columns=c, data=rows) for k, (c, rows) in tables.items()})
            self.run.log(data)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
