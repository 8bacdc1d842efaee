"""Import boundaries: what each layer of cedar may import, and that importing cedar changes nothing.

- the pure core imports no flwr, ultralytics or wandb (and the numpy-only modules no torch or cv2);
- strategies import no torch;
- only the adapter modules import Ultralytics (read from the source with ``ast``, then checked at run time);
- importing cedar sets no environment variable and writes no file (Ultralytics' settings included):
  only :func:`common.ultralytics_env.setup` does, and it leaves the user's own Ultralytics settings alone.

Every run-time check runs in a fresh interpreter: what one import loads must not hide another's.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import REPO

PACKAGES = ("common", "clients", "server", "strategies")
ADAPTER = {"common.yolo", "common.pyrafan", "common.prune", "common.ultralytics_env", "common.distill",
           "common.checkpoints"}


def _exists(module: str) -> bool:
    return (REPO / module.replace(".", "/")).with_suffix(".py").is_file()


PURE_CORE = ["common.graph", "common.kd", "common.keyframes", "common.routing", "common.schedule",
             *(m for m in ("common.detections", "common.offload") if _exists(m))]
# what else these may not import: they are numpy and the standard library only (plus cv2 where it is not listed)
LIGHT = {m: banned for m, banned in {"common.keyframes": ("torch", "cv2"), "common.routing": ("torch", "cv2"),
                                     "common.visdrone": ("torch", "cv2"), "common.adverse": ("torch",),
                                     "common.superres": ("torch",)}.items() if _exists(m)}
HEAVY = ("flwr", "ultralytics", "wandb")


def _modules(package: str) -> list[str]:
    return [package if p.stem == "__init__" else f"{package}.{p.stem}" for p in sorted((REPO / package).glob("*.py"))]


def _path(module: str) -> Path:
    path = REPO / module.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


ALL_MODULES = [m for pkg in PACKAGES for m in _modules(pkg)]


def _fresh(code: str, tmp_path: Path) -> dict:
    """Run ``code`` in a new interpreter with a clean cedar/Ultralytics environment; return what it prints (JSON).

    ``CEDAR_HOME`` and ``XDG_CONFIG_HOME`` (Ultralytics' default settings location) point into
    ``tmp_path``; no ``YOLO_*`` variable is inherited from the pytest process.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}
    env.update(CEDAR_HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "xdg"), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _loaded(packages) -> str:
    """Code that evaluates to the sorted top-level packages of ``packages`` present in ``sys.modules``."""
    return f"sorted({{m.split('.')[0] for m in sys.modules}} & set({list(packages)!r}))"


@pytest.mark.parametrize("module", sorted({*PURE_CORE, *LIGHT}))
def test_pure_core_imports_no_flwr_ultralytics_or_wandb(module, tmp_path):
    banned = (*HEAVY, *LIGHT.get(module, ()))

    out = _fresh(f"import json, sys, {module}; print(json.dumps({_loaded(banned)}))", tmp_path)

    assert out == []


@pytest.mark.parametrize("module", _modules("strategies"))
def test_strategies_import_no_torch(module, tmp_path):
    out = _fresh(f"import json, sys, {module}; print(json.dumps({_loaded(('torch', 'ultralytics'))}))", tmp_path)

    assert out == []


def _imports_of(path: Path) -> set[str]:
    """Top-level package of every import statement in a file, including those inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_only_the_adapter_imports_ultralytics():
    # Prepare: the scan sees imports inside functions too (the adapter imports Ultralytics lazily)
    assert "ultralytics" in _imports_of(REPO / "common" / "yolo.py")

    # Execute
    importers = {m for m in ALL_MODULES if "ultralytics" in _imports_of(_path(m))}

    # Assert
    assert importers <= ADAPTER, f"outside the adapter: {sorted(importers - ADAPTER)}"


def test_importing_cedar_loads_no_ultralytics_sets_no_variable_and_writes_no_file(tmp_path):
    """Every module but common.pyrafan (a subclass of Ultralytics' Detect, imported by the adapter on use)."""
    # Prepare: third-party packages first, so their own import-time effects are not counted as cedar's
    modules = [m for m in ALL_MODULES if m != "common.pyrafan"]
    code = f"""
        import importlib, json, os, sys
        import cv2, flwr, numpy, torch  # noqa: F401
        before = dict(os.environ)
        first = None
        for name in {modules!r}:
            importlib.import_module(name)
            if first is None and "ultralytics" in sys.modules:
                first = name
        changed = sorted(k for k in set(os.environ) | set(before) if os.environ.get(k) != before.get(k))
        print(json.dumps({{"first_to_load_ultralytics": first, "changed": changed}}))
    """

    # Execute
    out = _fresh(code, tmp_path)

    # Assert
    assert out == {"first_to_load_ultralytics": None, "changed": []}
    assert not (tmp_path / "home").exists() and not (tmp_path / "xdg").exists()


def test_setup_not_import_configures_ultralytics_and_leaves_the_users_settings_alone(tmp_path):
    # Prepare: the user's own Ultralytics settings file, with sync on
    user_settings = tmp_path / "xdg" / "Ultralytics" / "settings.json"
    user_settings.parent.mkdir(parents=True)
    user_settings.write_text('{"sync": true}')
    code = """
        import json, os, sys
        before = dict(os.environ)
        import common.yolo
        imported = {"ultralytics": "ultralytics" in sys.modules, "env_changed": dict(os.environ) != before}
        root = common.yolo.setup()
        from ultralytics.utils import SETTINGS
        cedar = json.loads((root / "Ultralytics" / "settings.json").read_text())
        print(json.dumps({"imported": imported, "root": str(root), "offline": os.environ["YOLO_OFFLINE"],
                          "autoinstall": os.environ["YOLO_AUTOINSTALL"], "sync": [SETTINGS["sync"], cedar["sync"]],
                          "font": (root / "Ultralytics" / "Arial.ttf").is_file()}))
    """

    # Execute
    out = _fresh(code, tmp_path)

    # Assert
    assert out["imported"] == {"ultralytics": False, "env_changed": False}
    assert out["root"] == str(tmp_path / "home" / "ultralytics")
    assert (out["offline"], out["autoinstall"], out["sync"], out["font"]) == ("1", "false", [False, False], True)
    assert user_settings.read_text() == '{"sync": true}'


def test_setup_after_ultralytics_was_imported_switches_off_in_memory_only(tmp_path):
    # Prepare: Ultralytics imported first, so it keeps the user's settings file (XDG_CONFIG_HOME)
    user_settings = tmp_path / "xdg" / "Ultralytics" / "settings.json"
    code = """
        import json
        import ultralytics.utils as u
        from ultralytics.utils import checks
        on_disk = u.SETTINGS_FILE.read_text()
        from common.ultralytics_env import setup
        setup()
        print(json.dumps({"sync": u.SETTINGS["sync"], "online": [u.ONLINE, checks.ONLINE],
                          "autoinstall": [u.AUTOINSTALL, checks.AUTOINSTALL],
                          "file_unchanged": u.SETTINGS_FILE.read_text() == on_disk, "file": str(u.SETTINGS_FILE)}))
    """

    # Execute
    out = _fresh(code, tmp_path)

    # Assert
    assert out["file"] == str(user_settings)
    assert (out["sync"], out["online"], out["autoinstall"]) == (False, [False, False], [False, False])
    assert out["file_unchanged"] is True
