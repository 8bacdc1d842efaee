"""Start and stop a real Flower deployment (SuperLink, SuperNodes, ``flwr run``) on loopback, for tests.

A plain module (not a test file), imported by ``tests/test_deployment.py``, the TLS /
SuperNode-authentication tests and the chaos tests (``tests/test_chaos.py``: :class:`Deployment`,
:func:`kill_tree`).

Flower 1.41's deployment CLI, as used here:

- ``flower-superlink --insecure --host 127.0.0.1 --port P``: ONE HTTP port
  serves the Fleet API (SuperNodes), the Control API (``flwr run``) and the
  Runtime API (the ServerApp). The old ``--fleet-api-address`` /
  ``--control-api-address`` flags are deprecated (ignored); the old
  ``--serverappio-api-address`` is rejected. With the default
  ``--isolation subprocess`` the SuperLink starts ``flower-superexec``, which
  starts one ``flwr-serverapp`` per run.
- ``flower-supernode --insecure --superlink 127.0.0.1:P --node-config "site-index=0"
  --host 127.0.0.1 --port Q``: ``Q`` is the SuperNode's own Runtime HTTP API
  (distinct per SuperNode on one machine; ``--clientappio-api-address`` is
  rejected in 1.41). With the default ``--isolation subprocess`` it starts
  ``flower-superexec``, which starts ``flwr-clientapp`` per message batch.
- ``flwr run <app> <connection> --run-config ... --stream``: ``<connection>``
  names a ``[superlink.<connection>]`` table of ``$FLWR_HOME/config.toml``
  whose ``address`` is the SuperLink's ``127.0.0.1:P`` (see
  :func:`write_flwr_config`).

TLS and SuperNode authentication (``tests/test_secure_deployment.py``; files from
``python -m server.make_certs``):

- ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem
  --ssl-keyfile server.key --enable-supernode-auth`` (no ``--insecure``): all
  three APIs on HTTPS; the server certificate needs a SubjectAltName for the
  address clients dial *and* for ``127.0.0.1`` (the SuperLink's own SuperExec
  reaches the Runtime API there, ``0.0.0.0`` is rewritten to ``127.0.0.1``).
- ``flwr supernode register node-i.pub <connection> --location "lat,lon" --name
  site-i --format json`` (public key: one OpenSSH ``ecdsa-sha2-nistp*`` line)
  goes through the Control API of ``<connection>`` (``root-certificates`` in
  ``config.toml``); no account login is needed without ``--account-auth``.
  With ``--enable-supernode-auth`` this is the ONLY way a node id is created.
- ``flower-supernode --root-certificates ca.crt --auth-supernode-private-key
  node-i.key`` (OpenSSH private key): the node activates the id registered
  for its public key; an unregistered key gets ``[code: 2004] Failed to
  activate SuperNode`` and the process exits (rc 1, Flower exit code 305).

Every process gets ``FLWR_HOME`` (a temp dir: installed FABs, CLI config) and
``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (use this environment, no
``uv sync``), plus a per-test marker variable: the SuperExecs are started in
their own sessions and may outlive their parent, so :func:`stop_all` also finds
strays by that marker, not only by parenthood.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence

import psutil

from server.cloud_process import free_port  # noqa: F401  (the tests import it from here)
from server.simulate import stop_processes

HOST = "127.0.0.1"
MARKER_VAR = "CEDAR_DEPLOY_TEST_ID"


# --------------------------------------------------------------------- basics
def deploy_env(flwr_home: Path, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """Environment for every deployment process: temp ``FLWR_HOME``, no runtime installs, a test marker."""
    env = dict(os.environ if base is None else base)
    env.update({
        "FLWR_HOME": str(Path(flwr_home).resolve()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
        MARKER_VAR: env.get(MARKER_VAR) or uuid.uuid4().hex,
    })
    env.update(extra)
    return env


def _bin(name: str) -> str:
    """The console script next to this interpreter (the ``flwr`` of the environment cedar is installed in)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def tail(path: Path | str, lines: int = 60) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return f"<no log at {path}>"
    return "\n".join(text.splitlines()[-lines:])


_NOISE = ("--insecure", "SuperNode authentication is disabled")


def problems(paths: Iterable[Path | str], lines: int = 40) -> str:
    """The ERROR/WARNING lines and exception lines of the given logs (the cause is rarely in the last lines)."""
    found = []
    for path in paths:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if any(k in line for k in ("ERROR", "WARNING", "Error:", "Exception", "Traceback")) \
                    and not any(n in line for n in _NOISE):
                found.append(f"{Path(path).name}: {line[:400]}")
    return "\n".join(found[-lines:]) or "<no ERROR/WARNING lines>"


@dataclass
class Proc:
    """A started process, its log file and (for servers) its port."""

    name: str
    popen: subprocess.Popen
    log: Path
    port: int | None = None
    args: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 60) -> str:
        return f"----- {self.name} (pid {self.pid}, rc {self.popen.poll()}) {self.log} -----\n{tail(self.log, lines)}"


def start_process(name: str, args: Sequence[str], env: Mapping[str, str], log_dir: Path,
                  cwd: Path | None = None, port: int | None = None) -> Proc:
    """Start ``args`` with stdout+stderr into ``log_dir/<name>.log`` (never a PIPE: a full pipe blocks the child)."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with open(log, "ab") as fh:  # the child keeps its own copy of the descriptor
        fh.write(f"$ {shlex.join(args)}\n".encode())
        fh.flush()
        popen = subprocess.Popen(list(args), env=dict(env), cwd=str(cwd or log_dir), stdout=fh,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Proc(name, popen, log, port, list(args))


def wait_for_port(port: int, host: str = HOST, timeout: float = 60.0, proc: Proc | None = None) -> None:
    """Block until ``host:port`` accepts TCP connections (fail early if ``proc`` died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited (rc {proc.popen.returncode}) before listening on "
                               f"{host}:{port}\n{proc.tail()}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s"
                       + (f"\n{proc.tail()}" if proc else ""))


def wait_for_log(proc: Proc, text: str, timeout: float = 60.0) -> None:
    """Block until ``text`` appears in the process log (fail early if it died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in tail(proc.log, 10_000):
            return
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited (rc {proc.popen.returncode}) before logging {text!r}\n"
                               f"{proc.tail()}")
        time.sleep(0.3)
    raise TimeoutError(f"{proc.name} did not log {text!r} in {timeout:.0f}s\n{proc.tail()}")


# ------------------------------------------------------------------ SuperLink
class TlsFiles(Protocol):
    """What :func:`server.make_certs.make_certs` returns (only these paths are used here)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def tls_superlink_args(certs: TlsFiles, supernode_auth: bool = False) -> list[str]:
    """``--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key [--enable-supernode-auth]``."""
    args = ["--ssl-ca-certfile", str(Path(certs.ca_cert).resolve()),
            "--ssl-certfile", str(Path(certs.server_cert).resolve()),
            "--ssl-keyfile", str(Path(certs.server_key).resolve())]
    if supernode_auth:
        args.append("--enable-supernode-auth")
    return args


def start_superlink(tmp: Path, env: Mapping[str, str], extra_args: Iterable[str] = (), *, insecure: bool = True,
                    port: int | None = None, host: str = HOST, isolation: str = "subprocess",
                    name: str = "superlink", wait: bool = True, certs: TlsFiles | None = None,
                    supernode_auth: bool = False) -> Proc:
    """``flower-superlink`` on ``host:port`` (one port for Fleet, Control and Runtime APIs in Flower 1.41).

    TLS: ``certs=make_certs(...)`` (implies ``insecure=False``); SuperNode authentication:
    ``supernode_auth=True`` (then only SuperNodes registered with ``flwr supernode register`` get in).
    ``extra_args`` are appended as given.
    """
    port = port or free_port(host)
    args = [_bin("flower-superlink"), "--host", host, "--port", str(port), "--isolation", isolation,
            "--disable-runtime-dependency-installation"]
    if certs is not None:
        args += tls_superlink_args(certs, supernode_auth)
    else:
        if insecure:
            args.append("--insecure")
        if supernode_auth:
            args.append("--enable-supernode-auth")
    args += list(extra_args)
    proc = start_process(name, args, env, Path(tmp) / "logs", port=port)
    if wait:
        wait_for_port(port, host, proc=proc)
    return proc


# ------------------------------------------------------------------ SuperNode
def node_config_arg(node_config: Mapping[str, object]) -> str:
    """``{"site-index": 0, "model-store": "/x"}`` -> ``'site-index=0 model-store="/x"'`` (TOML values)."""
    parts = []
    for key, value in node_config.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def start_supernode(tmp: Path, env: Mapping[str, str], superlink_address: str, node_config: Mapping[str, object],
                    extra_args: Iterable[str] = (), *, insecure: bool = True, root_cert: Path | str | None = None,
                    port: int | None = None, host: str = HOST, isolation: str = "subprocess",
                    name: str | None = None, wait: bool = True, auth_key: Path | str | None = None) -> Proc:
    """``flower-supernode`` connected to ``superlink_address`` (``host:port``), its Runtime API on ``host:port``.

    TLS: ``root_cert=<CA pem>`` (implies ``insecure=False``); authentication: ``auth_key=<node-i.key>``
    (``--auth-supernode-private-key``, an OpenSSH EC private key whose public key was registered).
    """
    port = port or free_port(host)
    name = name or f"supernode-{node_config.get('site-index', port)}"
    args = [_bin("flower-supernode"), "--superlink", superlink_address, "--node-config", node_config_arg(node_config),
            "--host", host, "--port", str(port), "--isolation", isolation]
    if root_cert is not None:
        args += ["--root-certificates", str(Path(root_cert).resolve())]
    elif insecure:
        args.append("--insecure")
    if auth_key is not None:
        args += ["--auth-supernode-private-key", str(Path(auth_key).resolve())]
    args += list(extra_args)
    proc = start_process(name, args, env, Path(tmp) / "logs", port=port)
    if wait:
        wait_for_port(port, host, proc=proc)  # its Runtime API: the process is up (not yet registered)
    return proc


# ---------------------------------------------------------------- flwr (CLI)
def write_flwr_config(flwr_home: Path, name: str, address: str, insecure: bool = True,
                      root_cert: Path | str | None = None) -> Path:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection ``name`` (made the default)."""
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    if insecure:
        lines.append("insecure = true")
    if root_cert is not None:
        lines.append(f'root-certificates = "{Path(root_cert).resolve()}"')
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def toml_str(value: str) -> str:
    """A TOML basic string (as ``server.simulate`` quotes run-config values)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_config_arg(preset: str, overrides: Sequence[str]) -> str:
    """``--run-config`` value: ``preset="quick" overrides="k=v k2=v2"`` (overrides shlex-joined)."""
    text = f"preset={toml_str(preset)}"
    if overrides:
        text += f" overrides={toml_str(shlex.join(list(overrides)))}"
    return text


def flwr_run_command(app_dir: Path, connection: str, preset: str, overrides: Sequence[str],
                     stream: bool = True) -> list[str]:
    cmd = [_bin("flwr"), "run", str(Path(app_dir).resolve()), connection, "--run-config",
           run_config_arg(preset, overrides)]
    if stream:
        cmd.append("--stream")
    return cmd


def flwr_cli(args: Sequence[str], env: Mapping[str, str], log_dir: Path | None = None, name: str = "flwr-cli",
             timeout: float = 120.0, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``flwr <args>`` to completion (stdout and stderr captured; appended to ``log_dir/<name>.log``)."""
    cmd = [_bin("flwr"), *args]
    res = subprocess.run(cmd, env=dict(env), cwd=str(cwd) if cwd else None, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=timeout)
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(log_dir) / f"{name}.log", "a") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n[rc {res.returncode}]\n{res.stdout}{res.stderr}\n")
    return res


def _json_out(res: subprocess.CompletedProcess) -> dict:
    """The JSON object ``flwr ... --format json`` printed (anything before the first ``{`` is ignored)."""
    text = res.stdout
    start = text.find("{")
    if start < 0:
        raise RuntimeError(f"no JSON from flwr (rc {res.returncode}):\n{res.stdout}\n{res.stderr}")
    return json.loads(text[start:])


def register_supernode(public_key: Path | str, connection: str, env: Mapping[str, str], *,
                       location: str | None = None, node_name: str | None = None, log_dir: Path | None = None,
                       timeout: float = 120.0) -> int:
    """``flwr supernode register <public key> <connection> [--location "lat,lon"] [--name N]``: the new node id.

    Only a SuperLink started with ``--enable-supernode-auth`` needs (and only then accepts) this; the key file
    is the OpenSSH public key (``node-<i>.pub`` of ``server.make_certs``).
    """
    args = ["supernode", "register", str(Path(public_key).resolve()), connection, "--format", "json"]
    if location is not None:
        args += ["--location", location]
    if node_name is not None:
        args += ["--name", node_name]
    res = flwr_cli(args, env, log_dir, name="flwr-supernode-register", timeout=timeout)
    out = _json_out(res) if "{" in res.stdout else {}
    if res.returncode != 0 or not out.get("success"):
        raise RuntimeError(f"flwr supernode register {public_key} failed (rc {res.returncode}):\n"
                           f"{res.stdout}\n{res.stderr}")
    return int(out["node-id"])


def list_supernodes(connection: str, env: Mapping[str, str], log_dir: Path | None = None,
                    timeout: float = 120.0) -> list[dict]:
    """``flwr supernode list <connection> --format json``: ``[{"node-id": "...", "status": "online", ...}]``.

    Status is ``registered`` (never connected), ``online``, ``offline`` or ``unregistered``; the listing does
    not include the location (the ServerApp's ``grid.get_nodes()`` does).
    """
    res = flwr_cli(["supernode", "list", connection, "--format", "json"], env, log_dir, name="flwr-supernode-list",
                   timeout=timeout)
    out = _json_out(res)
    if res.returncode != 0 or not out.get("success"):
        raise RuntimeError(f"flwr supernode list failed (rc {res.returncode}):\n{res.stdout}\n{res.stderr}")
    return list(out.get("nodes", []))


def wait_for_exit(proc: Proc, timeout: float = 60.0) -> int | None:
    """Wait up to ``timeout`` s for ``proc`` to exit; its return code, or ``None`` if still running."""
    try:
        return proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


# ---------------------------------------------------------------- a deployment
@dataclass
class Deployment:
    """A SuperLink and its SuperNodes on loopback, for one test; :meth:`stop` stops all it started."""

    tmp: Path
    env: dict
    connection: str = "cedar-test"
    superlink: Proc | None = None
    supernodes: dict[int, Proc] = field(default_factory=dict)  # by site index
    procs: list[Proc] = field(default_factory=list)  # everything started, for teardown and logs

    @property
    def address(self) -> str:
        return f"{HOST}:{self.superlink.port}"

    def start_superlink(self, *extra_args: str, port: int | None = None, name: str = "superlink") -> Proc:
        """``flower-superlink`` (insecure), also written as the ``flwr`` CLI's default connection."""
        self.superlink = start_superlink(self.tmp, self.env, extra_args, port=port, name=name, wait=False)
        self.procs.append(self.superlink)
        wait_for_port(self.superlink.port, proc=self.superlink)
        write_flwr_config(Path(self.env["FLWR_HOME"]), self.connection, self.address, insecure=True)
        return self.superlink

    def start_supernodes(self, sites: Iterable[int], name: str = "supernode-{}",
                         **node_config: object) -> list[Proc]:
        """One SuperNode per site index, its model store ``tmp/stores/site-<i>`` unless ``node_config`` names one."""
        started = []
        for i in sites:
            config = {"site-index": i, "model-store": str(self.tmp / "stores" / f"site-{i}"), **node_config}
            node = start_supernode(self.tmp, self.env, self.address, config, name=name.format(i), wait=False)
            self.procs.append(node)
            self.supernodes[i] = node
            started.append(node)
        for node in started:
            wait_for_port(node.port, proc=node)
        return started

    def logs(self, lines: int = 40) -> str:
        """Problems found in every log, then the last lines of each (for assertion messages)."""
        extra = [x for x in [self.tmp / "logs" / "flwr-run.log"] if x.exists()]
        return "\n".join([f"----- problems -----\n{problems([p.log for p in self.procs] + extra)}"]
                         + [p.tail(lines) for p in self.procs]
                         + [f"----- {x} -----\n{tail(x, lines)}" for x in extra])

    def stop(self) -> list[str]:
        """Stop everything started (and strays carrying this deployment's marker); what is still alive."""
        return stop_all(self.procs, marker=self.env[MARKER_VAR])


# ---------------------------------------------------------------- stopping
def tree(proc: Proc | subprocess.Popen | int) -> list[psutil.Process]:
    """The process and all its descendants (those still alive)."""
    pid = proc if isinstance(proc, int) else proc.pid
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def marked(marker: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``MARKER_VAR=marker`` (strays that left their tree included)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(MARKER_VAR) == marker and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def stop_tree(proc: Proc | subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate (then kill) ``proc`` and its descendants; the whole tree is collected before anything stops."""
    stop_processes(tree(proc), timeout)
    popen = proc.popen if isinstance(proc, Proc) else proc
    try:
        popen.wait(timeout=5)  # reap our direct child
    except subprocess.TimeoutExpired:
        pass


def kill_tree(proc: Proc, descendants: bool = True) -> list[int]:
    """SIGKILL ``proc`` and its descendants at once, as when the box loses power (``descendants=False``: the
    process alone); the pids killed."""
    family = tree(proc) if descendants else tree(proc)[:1]
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)
    proc.popen.wait(timeout=10)  # reap our direct child
    return [p.pid for p in family]


def stop_all(procs: Iterable[Proc], marker: str | None = None, timeout: float = 10.0) -> list[str]:
    """Stop the given processes' trees, then any stray carrying ``marker``; return what is still alive."""
    procs = list(procs)
    family = [p for proc in procs for p in tree(proc)]
    if marker:
        family += marked(marker)
    stop_processes(family, timeout)
    for proc in procs:
        try:
            proc.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    left = [f"{proc.name} (pid {proc.pid})" for proc in procs if proc.alive()]
    if marker:
        for p in marked(marker):
            try:
                left.append(f"{shlex.join(p.cmdline()[:3])} (pid {p.pid})")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    return left
