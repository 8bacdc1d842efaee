"""Session-wide safety and a tiny built-in benchmark shared by the tests.

The environment is set at import time, before any test module imports
Ultralytics or ``wandb``:

- ``WANDB_MODE=disabled``: no tracker ever starts a W&B run;
- ``CEDAR_HOME``: a throw-away folder, so Ultralytics' settings, fonts and
  runs and the nodes' model stores never touch the developer's home;
- :func:`common.ultralytics_env.setup`: Ultralytics offline, its config dir under
  that ``CEDAR_HOME``, also for test modules that import Ultralytics (or
  ``common.pyrafan``) directly.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="cedar-test-home-"))
os.environ["WANDB_MODE"] = "disabled"
os.environ["WANDB_SILENT"] = "true"
os.environ["CEDAR_HOME"] = str(_SESSION_HOME)
os.environ["MPLBACKEND"] = "Agg"
# Ultralytics' config dir derives from CEDAR_HOME (never the developer's)
os.environ.pop("YOLO_CONFIG_DIR", None)

from common.benchmark import Benchmark, GeneratorSettings, generate  # noqa: E402
from common.console import CEDAR_LOGGERS  # noqa: E402
from common.ultralytics_env import setup  # noqa: E402  (its CEDAR_HOME is read on first import)

setup()


def pytest_unconfigure(config):
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def _loggers_as_before():
    """A test that runs an app in-process (``run_federation``) calls :func:`common.console.configure_logging`,
    which stops Flower's and cedar's loggers from propagating; later tests would see none of their records in
    ``caplog``. Each test leaves those loggers as it found them."""
    loggers = [logging.getLogger(name) for name in ("flwr", *CEDAR_LOGGERS)]
    saved = [(logger, logger.propagate, logger.level, list(logger.handlers)) for logger in loggers]
    yield
    for logger, propagate, level, handlers in saved:
        logger.propagate, logger.handlers[:] = propagate, handlers
        logger.setLevel(level)


# 2 sites x (8 train + 4 val + 4 test + 4 public test + 4 public train) images at 128 px and a
# 12-frame clip each: ~1 s
TINY = dict(num_sites=2, imgsz=128, train_per_site=8, val_per_site=4, test_per_site=4, public_per_site=4,
            public_train_per_site=4, video_frames=12)


@pytest.fixture(scope="session")
def cedar_home() -> Path:
    return _SESSION_HOME


@pytest.fixture(scope="session")
def tiny_settings() -> GeneratorSettings:
    return GeneratorSettings(**TINY)


@pytest.fixture(scope="session")
def tiny_benchmark(tiny_settings, tmp_path_factory) -> Benchmark:
    """The tiny benchmark, generated once per session (tests must not modify it)."""
    return generate(tiny_settings, tmp_path_factory.mktemp("benchmark-cache"))


@pytest.fixture(scope="session")
def tiny_overrides(tiny_benchmark) -> dict:
    """Dotted config overrides under which ``benchmark_from_config`` resolves to ``tiny_benchmark``.

    The quick preset sets its own data sizes, so every generator field that
    differs from the schema default is given here.
    """
    data = {f"data.{k.replace('_', '-')}": v for k, v in TINY.items()}
    data["data.similar-pairs"] = False  # the quick preset pairs its sites; the tiny benchmark does not
    return {**data, "data.cache-dir": str(tiny_benchmark.root.parent), "train.imgsz": 128, "train.batch": 4,
            "eval.batch": 4, "train.epochs-per-round": 1, "train.warmup-iters": 2}
