"""The cloud detection service (:mod:`server.cloud`) as a child process of the ServerApp.

With ``cloud.serve`` (default) the ServerApp runs ``python -m server.cloud`` on
loopback with a freshly generated bearer token, serving the current cloud model,
and every train message tells the sites where it is and the token
(``common.protocol.CLOUD_URL``/``CLOUD_TOKEN``). Its hard-sample store is the one
the cloud model is fine-tuned on before a cloud-to-edge KD round
(:class:`server.models.CloudModel`), which then :meth:`CloudProcess.restart`\\ s
the service on the new weights (the service loads its model once, at start).

The process never outlives the run: use it as a context manager
(``with CloudProcess(...) as service:``); :meth:`stop` terminates it by pid,
then kills it. In a deployment where the nodes are on other hosts, run the
service there yourself (``python -m server.cloud``, see its docstring), set
``cloud.serve=false`` and give the sites ``routing.cloud-url`` and
``routing.cloud-token-file`` (or node-config ``cloud-url``/``cloud-token-file``).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from common.tokens import new_token_file

if TYPE_CHECKING:
    from common.config import CedarConfig
    from server.models import CloudModel

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent.parent


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it dies (Linux), so the service
    never outlives a ServerApp that was killed without running its ``finally``."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class CloudProcessError(RuntimeError):
    """The service did not come up; the message names the weights and the service's last log lines."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class CloudProcess:
    """``python -m server.cloud`` on ``host`` (loopback), its token in ``workdir/token``, its log in
    ``workdir/service.log``.

    ``args`` are further CLI options of :mod:`server.cloud` (``["--imgsz", "256", "--device", "cpu"]``).
    """

    def __init__(self, weights: str | Path, store: str | Path, workdir: str | Path, *, args: list[str] = (),
                 host: str = "127.0.0.1", startup_timeout_s: float = 120.0, threads: int = 1):
        self.weights, self.store, self.workdir = Path(weights), Path(store), Path(workdir)
        self.args, self.host, self.startup_timeout_s, self.threads = list(args), host, startup_timeout_s, threads
        self.token_file, self.log_path = self.workdir / "token", self.workdir / "service.log"
        self.proc: subprocess.Popen | None = None
        self.token = ""
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "CloudProcess":
        """Start the service and wait until ``/health`` answers; raises :class:`CloudProcessError` if it does not."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.token = self.token or new_token_file(self.token_file)
        self.port = self.port or free_port(self.host)  # a restart keeps the URL the sites know
        cmd = [sys.executable, "-m", "server.cloud", "--weights", str(self.weights), "--store", str(self.store),
               "--host", self.host, "--port", str(self.port), "--token-file", str(self.token_file), *self.args]
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(APP_DIR), env.get("PYTHONPATH", "")) if p)
        with open(self.log_path, "ab") as logfile:
            self.proc = subprocess.Popen(cmd, cwd=APP_DIR, env=env, stdout=logfile, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        try:
            health = self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        log.info("cloud service: %s (pid %s) serving %s (%s), hard samples in %s", self.url, self.proc.pid,
                 self.weights, health.get("model"), self.store)
        return self

    def wait_healthy(self) -> dict:
        """Poll ``GET /health`` until it answers 200; fail early when the process exits."""
        import httpx

        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise CloudProcessError(f"cloud service (weights {self.weights}) exited with code "
                                        f"{self.proc.returncode}:\n{self.log_tail()}")
            try:
                reply = httpx.get(f"{self.url}/health", timeout=2.0)
                if reply.status_code == 200:
                    return reply.json()
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise CloudProcessError(f"cloud service (weights {self.weights}) not healthy on {self.url} after "
                                        f"{self.startup_timeout_s:.0f}s:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the service by pid, wait, then kill it if it is still running."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        log.info("cloud service: stopped (pid %s)", proc.pid)

    def restart(self, weights: str | Path) -> None:
        """Serve ``weights`` instead (same URL, token and store)."""
        self.stop()
        self.weights = Path(weights)
        self.start()

    def __enter__(self) -> "CloudProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(cfg: CedarConfig, cloud: CloudModel) -> CloudProcess:
    """Start the service on ``cloud``'s current weights and hard-sample store; ``cloud`` restarts it on every
    new version of the model. The caller stops it (``try``/``finally``)."""
    t = cfg.train
    service = CloudProcess(cloud.path, cloud.store, cloud.dir, args=["--imgsz", str(t.imgsz), "--device", t.device],
                           startup_timeout_s=cfg.cloud.startup_timeout_s, threads=t.threads)
    cloud.service = service.start()
    return service
