"""``cedar-simulate``: run a simulated federation with ``flwr run .`` and clean up after it.

It does what the bare ``flwr run .`` leaves to the user:

- validates the config first (a bad key fails here, naming the key);
- sets ``num-supernodes`` to the number of sites in the config, and the CPUs and GPUs each simulated ClientApp
  reserves (``federation.client-cpus``, default ``train.threads``; ``federation.client-gpus``) and Ray's
  CPUs in all (``federation.sim-cpus``);
- sets ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` so Flower uses this
  (already installed) environment instead of building a fresh one per run, and
  ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0`` (Ray's future default, without its warning);
- streams the logs, and stops the local SuperLink that ``flwr run`` started
  in the background (unless it was already running before, or ``--keep-superlink``).

Equivalent manual command (quick preset, 4 sites)::

    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run . --stream \\
        --federation-config "num-supernodes=4 client-resources-num-cpus=2 client-resources-num-gpus=0.0" \\
        --run-config "preset='quick'"
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent.parent
LOCAL_SUPERLINK_MARK = "--simulation"


def local_superlinks() -> list:
    """Processes of a ``flower-superlink --simulation`` (the one ``flwr run`` starts)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if any(part.endswith("flower-superlink") for part in cmd[:2]) and LOCAL_SUPERLINK_MARK in cmd:
            found.append(proc)
    return found


def stop_processes(procs: list, timeout: float = 15.0) -> None:
    """Terminate ``procs`` (psutil processes), wait, then kill whatever is still alive."""
    import psutil

    procs = list({p.pid: p for p in procs}.values())
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def stop_local_superlinks(timeout: float = 15.0) -> int:
    """Terminate (then kill) local simulation SuperLinks and their children; returns how many."""
    procs = local_superlinks()
    stop_processes([c for p in procs for c in p.children(recursive=True)] + procs, timeout)
    return len(procs)


def build_command(preset: str, overrides: list[str], num_nodes: int, app_dir: Path = APP_DIR,
                  client_cpus: int = 2, client_gpus: float = 0.0, sim_cpus: int = 0) -> list[str]:
    """``flwr run`` of the app: the preset and overrides as its run config, the simulation's size and resources
    (``federation.client-cpus``, ``client-gpus``, ``sim-cpus``; 0 sim_cpus: Ray takes every CPU) as its
    federation config."""
    run_config = f"preset={_toml_str(preset)}"
    if overrides:
        run_config += f" overrides={_toml_str(shlex.join(overrides))}"
    federation = (f"num-supernodes={num_nodes} client-resources-num-cpus={int(client_cpus)} "
                  f"client-resources-num-gpus={float(client_gpus)}")
    if sim_cpus:
        federation += f" init-args-num-cpus={int(sim_cpus)}"
    return ["flwr", "run", str(app_dir), "--stream", "--run-config", run_config, "--federation-config", federation]


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cedar-simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="quick", help="conf/<preset>.yaml (quick, standard, paper)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. federation.num-rounds=5")
    parser.add_argument("--keep-superlink", action="store_true", help="leave the local SuperLink running")
    args = parser.parse_args(argv)

    from common.config import ConfigError, load_config, model_init_path, parse_value
    from common.sites import num_sites

    run_name = f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    user_overrides = [o for o in args.overrides if not o.replace("_", "-").startswith("run-name=")]
    if len(user_overrides) != len(args.overrides):
        run_name = next(o.split("=", 1)[1] for o in args.overrides if o not in user_overrides)
    args.overrides = user_overrides + [f"run-name={run_name}"]
    if not any(o.replace("_", "-").startswith("output-dir=") for o in args.overrides):
        args.overrides.append(f"output-dir={Path('outputs').resolve()}")  # the ServerApp's cwd is not ours
    overrides = {k: parse_value(v) for k, v in (o.split("=", 1) for o in args.overrides if "=" in o)}
    bad = [o for o in args.overrides if "=" not in o]
    try:
        if bad:
            raise ConfigError(f"override '{bad[0]}' is not key=value")
        cfg = load_config(args.preset, overrides)
        for key in ("edge_init", "cloud_init"):  # the ServerApp reads them, on this machine
            model_init_path(cfg, key)
    except ConfigError as err:
        print(f"cedar-simulate: {err}", file=sys.stderr)
        return 2
    n = num_sites(cfg)
    # Ray (the simulation engine) leaves CUDA_VISIBLE_DEVICES alone for CPU-only actors, and says nothing about it
    env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
    was_running = bool(local_superlinks())
    f = cfg.federation
    cpus = f.client_cpus or cfg.train.threads
    cmd = build_command(args.preset, args.overrides, n, client_cpus=cpus, client_gpus=f.client_gpus,
                        sim_cpus=f.sim_cpus)
    at_once = max(1, (f.sim_cpus or os.cpu_count() or 1) // cpus)
    print(f"cedar-simulate: {n} sites, {f.num_rounds} rounds, up to {min(n, at_once)} ClientApps at once "
          f"({cpus} CPUs each): {shlex.join(cmd)}", flush=True)
    t0 = time.monotonic()
    try:
        rc = subprocess.call(cmd, env=env, cwd=APP_DIR)
    finally:
        if not was_running and not args.keep_superlink:
            stop_local_superlinks()
    run_dir = Path(cfg.output_dir).expanduser().resolve() / run_name
    done = (run_dir / "summary.md").is_file() and (run_dir / "DONE").is_file()
    if rc == 0 and not done:
        rc = 1  # flwr run exits 0 even when the ServerApp raised
    print(f"cedar-simulate: {'finished' if rc == 0 else 'FAILED'} in {time.monotonic() - t0:.0f}s; "
          f"results in {run_dir}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
