"""Ultralytics, offline and self-contained: :func:`setup`, called before anything touches Ultralytics.

Importing this module changes nothing. :func:`setup` (idempotent; every
function of the adapter, ``common.yolo``, calls it first) makes Ultralytics

- offline: ``YOLO_OFFLINE=1`` (no connectivity checks), ``YOLO_AUTOINSTALL=false``
  (no pip installs of "missing" packages), ``YOLO_VERBOSE=false`` unless set;
- isolated: its config dir is ``YOLO_CONFIG_DIR`` if set, else ``$CEDAR_HOME/ultralytics``
  (``CEDAR_HOME`` defaults to ``~/.cache/cedar``), so the user's own Ultralytics
  settings are never read or written;
- quiet: ``sync`` and every integration (W&B, hub, MLflow, ...) off in its settings,
  runs, weights and datasets under that dir, its logger at WARNING;
- download-free: a local TTF (matplotlib's DejaVu Sans) is copied there as ``Arial.ttf``,
  the font Ultralytics would otherwise download for plotting.

Ultralytics reads its environment when it is first imported, so :func:`setup` must
run before that import. If something imported Ultralytics earlier, :func:`setup`
still switches auto-install, connectivity and the integrations off, in memory only
(the settings file Ultralytics chose is left as it is), and logs a warning.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

log = logging.getLogger(__name__)

CEDAR_HOME = Path(os.environ.get("CEDAR_HOME", "~/.cache/cedar")).expanduser()  # read when first imported

# settings switched off: cloud sync and every experiment-tracker integration
INTEGRATIONS = ("sync", "wandb", "mlflow", "comet", "clearml", "dvc", "neptune", "raytune", "tensorboard",
                "vscode_msg", "openvino_msg")

_done: Path | None = None


def config_dir() -> Path:
    """Ultralytics' config dir under cedar: ``YOLO_CONFIG_DIR`` if set, else ``$CEDAR_HOME/ultralytics``."""
    return Path(os.environ.get("YOLO_CONFIG_DIR") or CEDAR_HOME / "ultralytics").expanduser()


def setup() -> Path:
    """Make Ultralytics offline and self-contained (see the module docstring); returns :func:`config_dir`.

    Idempotent: the second and later calls return at once.
    """
    global _done
    if _done is not None:
        return _done
    root = config_dir()
    preloaded = "ultralytics" in sys.modules
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "false"
    os.environ.setdefault("YOLO_VERBOSE", "false")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(root))
    user_dir = root / "Ultralytics"  # what Ultralytics makes of YOLO_CONFIG_DIR
    user_dir.mkdir(parents=True, exist_ok=True)
    font = user_dir / "Arial.ttf"
    if not font.exists():
        import matplotlib

        shutil.copyfile(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", font)

    from ultralytics import utils
    from ultralytics.utils import checks

    settings = {k: False for k in INTEGRATIONS if k in utils.SETTINGS}
    if preloaded and utils.USER_CONFIG_DIR != user_dir:
        log.warning("Ultralytics was imported before cedar's offline setup: its settings stay in %s; "
                    "auto-install, connectivity checks and integrations are switched off in memory only",
                    utils.USER_CONFIG_DIR)
        dict.update(utils.SETTINGS, settings)  # in memory: never rewrite the user's own settings file
    else:
        utils.SETTINGS.update({**settings, "runs_dir": str(root / "runs"), "weights_dir": str(root / "weights"),
                               "datasets_dir": str(root / "datasets")})
    for module in (utils, checks):  # constants read from the environment at import
        module.ONLINE = False
        module.AUTOINSTALL = False
    utils.LOGGER.setLevel(logging.WARNING)
    _done = root
    return root
