"""Secure deployment on loopback: TLS everywhere and SuperNode authentication (Flower 1.41).

What runs, per test (fixture ``secure``):

1. ``python -m server.make_certs`` (the function) writes a test CA, a server certificate for
   ``127.0.0.1``/``localhost`` and three SuperNode key pairs (``node-0..2``) into ``tmp_path``;
2. ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key
   --enable-supernode-auth`` (HTTPS on one port for the Fleet, Control and Runtime APIs);
3. ``$FLWR_HOME/config.toml`` names that SuperLink with ``root-certificates = ".../ca.crt"``, and
   ``flwr supernode register node-<i>.pub <connection> --location ... --name site-<i>`` registers
   sites 0 and 1 (``node-2`` stays unregistered);
4. two ``flower-supernode --root-certificates ca.crt --auth-supernode-private-key node-<i>.key
   --node-config "site-index=<i> model-store=..."`` come online under their registered ids.

Tests: one cedar round through ``flwr run`` over TLS; the registered location and name reach the
ServerApp through ``grid.get_nodes()`` (a throw-away probe app); the unregistered key is refused,
and the SuperLink really speaks TLS with the test CA (and only with it).

Run with ``pytest -m integration tests/test_secure_deployment.py`` (``test_make_certs_files`` runs in the
default suite); helpers in
``tests/deploy_helpers.py``. Teardown always stops every process started (asserted).
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from server.make_certs import Credentials, make_certs
from tests import REPO
from tests.deploy_helpers import (
    HOST,
    MARKER_VAR,
    Proc,
    deploy_env,
    flwr_run_command,
    list_supernodes,
    problems,
    register_supernode,
    start_superlink,
    start_supernode,
    stop_all,
    tail,
    wait_for_exit,
    wait_for_log,
    wait_for_port,
    write_flwr_config,
)

integration = pytest.mark.integration  # every test but the make_certs one (that runs in the default suite)

APP_DIR = REPO  # the Flower app
CONNECTION = "cedar-secure"
LOCATIONS = {0: "1.5,0.2", 1: "-0.4,2.8"}  # "<latitude>,<longitude>" as `flwr supernode register --location` takes
RUN_TIMEOUT_S = 600  # flwr run --stream (the whole round, 2 CPU cores shared)
DONE_TIMEOUT_S = 300  # after flwr run returned: the ServerApp writing DONE
ONLINE_TIMEOUT_S = 90  # a registered SuperNode activating its id
REFUSE_TIMEOUT_S = 90  # the unregistered SuperNode giving up


@dataclass
class SecureDeployment:
    tmp: Path
    env: dict
    certs: Credentials
    address: str = ""
    superlink: Proc | None = None
    supernodes: list[Proc] = field(default_factory=list)
    node_ids: dict[int, int] = field(default_factory=dict)  # site index -> registered node id
    procs: list[Proc] = field(default_factory=list)  # everything started, for teardown

    @property
    def log_dir(self) -> Path:
        return self.tmp / "logs"

    def logs(self, lines: int = 40) -> str:
        """Problems found in every log, then the last lines of each (for assertion messages)."""
        extra = sorted(p for p in self.log_dir.glob("flwr-*.log"))
        return "\n".join([f"----- problems -----\n{problems([p.log for p in self.procs] + extra)}"]
                         + [p.tail(lines) for p in self.procs]
                         + [f"----- {x} -----\n{tail(x, lines)}" for x in extra])

    def flwr_run(self, app_dir: Path, run_config: str | None = None, preset: str = "quick",
                 overrides: list[str] | None = None, log_name: str = "flwr-run") -> tuple[int | None, Path]:
        """``flwr run <app> <connection> --stream`` to completion; (rc or None on timeout, its log)."""
        if run_config is None:
            cmd = flwr_run_command(app_dir, CONNECTION, preset, overrides or [], stream=True)
        else:
            cmd = flwr_run_command(app_dir, CONNECTION, preset, [], stream=True)
            cmd[cmd.index("--run-config") + 1] = run_config
        log = self.log_dir / f"{log_name}.log"
        with open(log, "wb") as fh:
            try:
                rc = subprocess.run(cmd, env=self.env, cwd=self.tmp, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT_S).returncode
            except subprocess.TimeoutExpired:
                rc = None
        return rc, log


@pytest.fixture
def secure(tmp_path):
    """TLS SuperLink with SuperNode auth + 2 registered, authenticated SuperNodes; always torn down."""
    certs = make_certs(tmp_path / "certs", nodes=3)  # node-2: a valid key pair that is never registered
    flwr_home = tmp_path / "flwr-home"
    env = deploy_env(flwr_home)
    dep = SecureDeployment(tmp_path, env, certs)
    try:
        dep.superlink = start_superlink(tmp_path, env, certs=certs, supernode_auth=True, wait=False)
        dep.procs.append(dep.superlink)
        wait_for_port(dep.superlink.port, proc=dep.superlink)
        wait_for_log(dep.superlink, "Application startup complete", timeout=60)
        dep.address = f"{HOST}:{dep.superlink.port}"
        write_flwr_config(flwr_home, CONNECTION, dep.address, insecure=False, root_cert=certs.ca_cert)

        for i in (0, 1):  # register BEFORE starting: an unregistered SuperNode exits at once
            dep.node_ids[i] = register_supernode(certs.node_pubs[i], CONNECTION, env, location=LOCATIONS[i],
                                                 node_name=f"site-{i}", log_dir=dep.log_dir)
        for i in (0, 1):
            node = start_supernode(tmp_path, env, dep.address,
                                   {"site-index": i, "model-store": str(tmp_path / "stores" / f"site-{i}")},
                                   root_cert=certs.ca_cert, auth_key=certs.node_keys[i], wait=False)
            dep.procs.append(node)
            dep.supernodes.append(node)
        for i, node in enumerate(dep.supernodes):
            wait_for_log(node, f"SuperNode ID: {dep.node_ids[i]}", timeout=ONLINE_TIMEOUT_S)
        yield dep
    finally:
        left = stop_all(dep.procs, marker=env[MARKER_VAR])
        assert not left, f"still alive after teardown: {left}\n{dep.logs()}"


def test_make_certs_files(tmp_path):
    """The CLI writes what Flower and the cloud service load, private files 0600, and keeps existing files."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from server.make_certs import main

    out = tmp_path / "c"
    assert main(["--out", str(out), "--hosts", "cloud.example.org", "10.1.2.3", "--nodes", "2", "--days", "30",
                 "--cloud-token"]) == 0
    for name in ("ca.key", "server.key", "node-0.key", "node-1.key", "cloud.token"):
        assert (out / name).stat().st_mode & 0o777 == 0o600, name
    for name in ("ca.crt", "server.pem", "node-0.pub"):  # certificates and public keys: world-readable
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    cert = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "cloud.example.org"}
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert 29 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 31
    # the formats Flower 1.41 loads: flower-supernode (private) and flwr supernode register (public)
    priv = load_ssh_private_key((out / "node-0.key").read_bytes(), None)
    pub = load_ssh_public_key((out / "node-0.pub").read_bytes())
    assert priv.public_key().public_numbers() == pub.public_numbers()
    assert pub.curve.name == "secp384r1"
    # the cloud service's TLS: a server context loads the pair
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(out / "server.pem", out / "server.key")
    # a second run keeps everything and adds node-2 only, signed by the same CA
    before = (out / "node-0.key").read_bytes(), (out / "ca.key").read_bytes()
    assert main(["--out", str(out), "--nodes", "3"]) == 0
    assert ((out / "node-0.key").read_bytes(), (out / "ca.key").read_bytes()) == before
    assert (out / "node-2.key").stat().st_mode & 0o777 == 0o600


@integration
def test_secure_round_with_registered_supernodes(secure, tiny_overrides):
    dep = secure
    out_dir = dep.tmp / "out"
    overrides = [f"{k}={v}" for k, v in tiny_overrides.items()] + [
        "data.num-sites=2", f"output-dir={out_dir}", "run-name=sec", "tracking.wandb=off",
        "federation.num-rounds=1", "kd.mode=none", "federation.wait-for-nodes-s=60", "federation.late-sites=[]",
    ]
    t0 = time.monotonic()
    rc, run_log = dep.flwr_run(APP_DIR, overrides=overrides)
    run_dir = out_dir / "sec"
    deadline = time.monotonic() + DONE_TIMEOUT_S
    while not (run_dir / "DONE").is_file() and time.monotonic() < deadline and dep.superlink.alive():
        time.sleep(1.0)
    elapsed = time.monotonic() - t0

    assert rc == 0, f"flwr run rc={rc} after {elapsed:.0f}s\n{dep.logs()}"
    assert "Successfully started run" in tail(run_log, 10_000), dep.logs()
    assert (run_dir / "DONE").is_file(), f"no {run_dir}/DONE after {elapsed:.0f}s\n{dep.logs()}"
    for proc in dep.procs:
        assert proc.alive(), f"{proc.name} died during the run\n{dep.logs()}"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert len(lines) == 2, lines
    assert sorted(r["site_id"] for r in lines) == ["site-0", "site-1"], lines
    assert all(r["round"] == 1 for r in lines), lines
    for i, node in enumerate(dep.supernodes):  # each authenticated SuperNode answered over TLS
        assert "Sent successfully" in tail(node.log, 10_000), node.tail()
        assert (dep.tmp / "stores" / f"site-{i}" / "model.pt").is_file(), dep.logs()
    # the SuperLink served HTTPS and saw only the two registered ids
    assert "Uvicorn running on https://" in tail(dep.superlink.log, 10_000), dep.superlink.tail()
    online = {int(n["node-id"]) for n in list_supernodes(CONNECTION, dep.env, dep.log_dir) if n["status"] == "online"}
    assert online == set(dep.node_ids.values()), (online, dep.node_ids)


PROBE_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "cedarprobe"
version = "0.1.0"
description = "Writes what grid.get_nodes() returns"
license = "Apache-2.0"
dependencies = ["flwr==1.41.*"]

[tool.flwr.app]
publisher = "cedar"

[tool.flwr.app.components]
serverapp = "cedarprobe.server:app"
clientapp = "cedarprobe.client:app"

[tool.flwr.app.config]
out = ""
"""

PROBE_SERVER = '''\
import json
import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes = []
    for _ in range(120):
        nodes = list(grid.get_nodes())
        if len(nodes) >= 2:
            break
        time.sleep(0.5)
    info = [{"node_id": n.node_id, "status": n.status,
             "location": n.location if n.HasField("location") else None,
             "name": n.name if n.HasField("name") else None} for n in nodes]
    with open(context.run_config["out"], "w") as fh:
        json.dump({"grid": type(grid).__name__, "nodes": info}, fh)
'''

PROBE_CLIENT = '''\
from flwr.clientapp import ClientApp

app = ClientApp()
'''


@integration
def test_registered_location_reaches_serverapp(secure):
    """``--location``/``--name`` of ``flwr supernode register`` come back in the ServerApp's ``grid.get_nodes()``."""
    dep = secure
    app = dep.tmp / "probe-app"
    (app / "cedarprobe").mkdir(parents=True)
    (app / "pyproject.toml").write_text(PROBE_PYPROJECT)
    (app / "cedarprobe" / "__init__.py").write_text("")
    (app / "cedarprobe" / "server.py").write_text(PROBE_SERVER)
    (app / "cedarprobe" / "client.py").write_text(PROBE_CLIENT)
    out = dep.tmp / "probe.json"

    rc, _ = dep.flwr_run(app, run_config=f'out="{out}"', log_name="flwr-run-probe")
    deadline = time.monotonic() + 60
    while not out.is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert rc == 0 and out.is_file(), f"probe run rc={rc}, no {out}\n{dep.logs()}"
    got = json.loads(out.read_text())
    assert got["grid"] == "HttpGrid", got
    by_id = {n["node_id"]: n for n in got["nodes"]}
    assert set(by_id) == set(dep.node_ids.values()), (got, dep.node_ids)
    for i, node_id in dep.node_ids.items():
        assert by_id[node_id]["location"] == LOCATIONS[i], got
        assert by_id[node_id]["name"] == f"site-{i}", got
        assert by_id[node_id]["status"] == "online", got


@integration
def test_unregistered_supernode_is_refused_and_tls_is_enforced(secure):
    dep = secure
    # a SuperNode whose key pair was never registered: the SuperLink refuses to activate it and it gives up
    intruder = start_supernode(dep.tmp, dep.env, dep.address, {"site-index": 2},
                               root_cert=dep.certs.ca_cert, auth_key=dep.certs.node_keys[2], name="intruder",
                               wait=False)
    dep.procs.append(intruder)
    rc = wait_for_exit(intruder, REFUSE_TIMEOUT_S)
    log = tail(intruder.log, 10_000)
    assert rc not in (None, 0), f"unregistered SuperNode still running / rc {rc}\n{intruder.tail()}"
    assert "Failed to activate SuperNode" in log, intruder.tail()
    assert "SuperNode ID:" not in log, intruder.tail()
    assert "No SuperNode found with the given public key" in tail(dep.superlink.log, 10_000), dep.superlink.tail()
    nodes = list_supernodes(CONNECTION, dep.env, dep.log_dir)
    assert {int(n["node-id"]) for n in nodes} == set(dep.node_ids.values()), nodes  # no third node id exists
    assert all(n["status"] == "online" for n in nodes), nodes  # the registered ones were not disturbed

    # TLS: the test CA verifies the SuperLink (as 127.0.0.1 and as localhost) ...
    ctx = ssl.create_default_context(cafile=str(dep.certs.ca_cert))
    for name in ("127.0.0.1", "localhost"):
        with socket.create_connection((HOST, dep.superlink.port), timeout=10) as sock:
            with ctx.wrap_socket(sock, server_hostname=name) as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
    # ... a client without it cannot, and a plain HTTP request gets no HTTP answer
    with pytest.raises(ssl.SSLCertVerificationError):
        with socket.create_connection((HOST, dep.superlink.port), timeout=10) as sock:
            ssl.create_default_context().wrap_socket(sock, server_hostname=HOST)
    with socket.create_connection((HOST, dep.superlink.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(10)
        try:
            answer = sock.recv(64)
        except (ConnectionResetError, socket.timeout):
            answer = b""
    assert not answer.startswith(b"HTTP/"), answer
