"""A real Kubernetes control plane on loopback: etcd + kube-apiserver + kube-controller-manager.

Like controller-runtime's envtest, plus the controller-manager (Jobs create Pods, ServiceAccounts
get token Secrets). No scheduler and no kubelet: ``tests.support.node.TestNode`` plays the node.

    with ControlPlane.start(assets_dir) as cp:
        v1 = kubernetes.client.CoreV1Api(cp.api_client)

Everything listens on 127.0.0.1 on free ports; ``stop()`` ends each process by PID.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes
import urllib3
import yaml

from .procs import ManagedProcess, free_port, tail, wait_for

ADMIN_USER = "admin"


def _write_sa_keys(key_path: Path, pub_path: Path) -> None:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
    except ImportError:
        subprocess.run(
            ["openssl", "genrsa", "-out", str(key_path), "2048"], check=True, capture_output=True
        )
        subprocess.run(
            ["openssl", "rsa", "-in", str(key_path), "-pubout", "-out", str(pub_path)],
            check=True,
            capture_output=True,
        )
        return
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    pub_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def make_api_client(server: str, token: str, ca_file: Path | None = None):
    """A kubernetes ApiClient for ``server`` authenticating with a bearer ``token``."""
    cfg = kubernetes.client.Configuration()
    cfg.host = server
    cfg.api_key = {"authorization": token}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    if ca_file is not None:
        cfg.ssl_ca_cert = str(ca_file)
        cfg.verify_ssl = True
    else:
        cfg.verify_ssl = False
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    return kubernetes.client.ApiClient(cfg)


@dataclass
class ControlPlane:
    workdir: Path
    server: str  # https://127.0.0.1:PORT
    port: int
    token: str  # admin bearer token (system:masters)
    kubeconfig: Path
    ca_file: Path  # the API server's self-signed serving cert (+ its CA)
    sa_key: Path
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    api_client: kubernetes.client.ApiClient | None = None
    _own_workdir: bool = True

    # -- lifecycle -----------------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        assets_dir: Path,
        workdir: Path | None = None,
        timeout: float = 90.0,
        extra_apiserver_flags: list[str] | None = None,
    ) -> ControlPlane:
        own = workdir is None
        workdir = Path(tempfile.mkdtemp(prefix="dbj-controlplane-")) if own else Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        bins = Path(assets_dir)
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        token = secrets.token_hex(16)
        (workdir / "tokens.csv").write_text(f'{token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
        sa_key, sa_pub = workdir / "sa.key", workdir / "sa.pub"
        _write_sa_keys(sa_key, sa_pub)
        certs = workdir / "certs"
        certs.mkdir(exist_ok=True)
        server = f"https://127.0.0.1:{api_port}"
        cp = cls(
            workdir=workdir,
            server=server,
            port=api_port,
            token=token,
            kubeconfig=workdir / "kubeconfig",
            ca_file=certs / "apiserver.crt",
            sa_key=sa_key,
            _own_workdir=own,
        )
        try:
            cp._start_etcd(bins, etcd_port, peer_port, timeout)
            cp._start_apiserver(bins, etcd_port, api_port, extra_apiserver_flags or [], timeout)
            cp._write_kubeconfig()
            cp.api_client = make_api_client(server, token, cp.ca_file)
            cp._start_controller_manager(bins, timeout)
        except BaseException:
            cp.stop()
            raise
        return cp

    def _start_etcd(self, bins: Path, port: int, peer_port: int, timeout: float) -> None:
        url = f"http://127.0.0.1:{port}"
        p = self.processes["etcd"] = ManagedProcess(
            "etcd",
            [
                bins / "etcd",
                "--data-dir", self.workdir / "etcd",
                "--listen-client-urls", url,
                "--advertise-client-urls", url,
                "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                "--initial-cluster", f"default=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
            ],
            self.workdir / "etcd.log",
        )  # fmt: skip
        http = urllib3.PoolManager()

        def healthy():
            p.check_alive()
            r = http.request("GET", f"{url}/health", timeout=2, retries=False)
            return r.status == 200 and b"true" in r.data

        wait_for("etcd /health", healthy, timeout, on_timeout=p.log_tail)

    def _start_apiserver(
        self, bins: Path, etcd_port: int, port: int, extra: list[str], timeout: float
    ) -> None:
        p = self.processes["kube-apiserver"] = ManagedProcess(
            "kube-apiserver",
            [
                bins / "kube-apiserver",
                "--etcd-servers", f"http://127.0.0.1:{etcd_port}",
                "--advertise-address", "127.0.0.1",
                "--bind-address", "127.0.0.1",
                "--secure-port", str(port),
                "--insecure-port", "0",
                "--cert-dir", self.workdir / "certs",
                "--token-auth-file", self.workdir / "tokens.csv",
                "--authorization-mode", "RBAC",
                "--service-account-key-file", self.workdir / "sa.pub",
                "--service-account-signing-key-file", self.sa_key,
                "--service-account-issuer", "https://kubernetes.default.svc",
                "--service-cluster-ip-range", "10.0.0.0/24",
                "--allow-privileged",
                "--profiling=false",
                *extra,
            ],
            self.workdir / "kube-apiserver.log",
        )  # fmt: skip
        http = urllib3.PoolManager(cert_reqs="CERT_NONE")
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        headers = {"Authorization": f"Bearer {self.token}"}

        def ready():
            p.check_alive()
            r = http.request(
                "GET", f"{self.server}/readyz", headers=headers, timeout=2, retries=False
            )
            return r.status == 200

        wait_for("kube-apiserver /readyz", ready, timeout, on_timeout=p.log_tail)

    def _write_kubeconfig(self) -> None:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": ADMIN_USER, "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "test",
                    "context": {"cluster": "test", "user": ADMIN_USER, "namespace": "default"},
                }
            ],
            "current-context": "test",
        }
        self.kubeconfig.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.kubeconfig.chmod(0o600)

    def _start_controller_manager(self, bins: Path, timeout: float) -> None:
        p = self.processes["kube-controller-manager"] = ManagedProcess(
            "kube-controller-manager",
            [
                bins / "kube-controller-manager",
                "--kubeconfig", self.kubeconfig,
                "--controllers", "*",
                "--service-account-private-key-file", self.sa_key,
                "--root-ca-file", self.ca_file,
                "--leader-elect=false",
                "--bind-address", "127.0.0.1",
                "--secure-port", "0",
                "--port", "0",
                "--profiling=false",
            ],
            self.workdir / "kube-controller-manager.log",
        )  # fmt: skip
        v1 = kubernetes.client.CoreV1Api(self.api_client)

        def default_sa_has_token():
            p.check_alive()
            sa = v1.read_namespaced_service_account("default", "default")
            return bool(sa.secrets)

        wait_for(
            "the controller-manager to give ServiceAccount default/default a token",
            default_sa_has_token,
            timeout,
            on_timeout=p.log_tail,
        )

    def stop(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            proc = self.processes.pop(name, None)
            if proc is not None:
                proc.stop()
        if self.api_client is not None:
            with contextlib.suppress(Exception):
                self.api_client.close()
            self.api_client = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers -------------------------------------------------------------------------------
    def check_alive(self) -> None:
        for proc in self.processes.values():
            proc.check_alive()

    def log(self, component: str, lines: int = 60) -> str:
        return tail(self.workdir / f"{component}.log", lines)

    def env(self) -> dict[str, str]:
        """Environment additions for a subprocess that should use this cluster (kubectl, kopf)."""
        return {"KUBECONFIG": str(self.kubeconfig)}

    def client_for_token(self, token: str) -> kubernetes.client.ApiClient:
        return make_api_client(self.server, token, self.ca_file)

    def service_account_token(self, namespace: str, name: str, timeout: float = 30.0) -> str:
        """The token the controller-manager minted for ServiceAccount ``namespace/name``."""
        import base64

        v1 = kubernetes.client.CoreV1Api(self.api_client)

        def token():
            sa = v1.read_namespaced_service_account(name, namespace)
            for ref in sa.secrets or []:
                sec = v1.read_namespaced_secret(ref.name, namespace)
                if sec.type == "kubernetes.io/service-account-token" and (sec.data or {}).get(
                    "token"
                ):
                    return base64.b64decode(sec.data["token"]).decode()
            return None

        return wait_for(f"a token for ServiceAccount {namespace}/{name}", token, timeout)
