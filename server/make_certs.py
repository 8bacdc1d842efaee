"""Test certificates and SuperNode keys for a secure Flower deployment (and the cloud service's TLS).

Run on the cloud host (or any trusted machine), then copy each file where it belongs::

    python -m server.make_certs --out certs --hosts cloud.example.org 203.0.113.7 --nodes 2 [--days 365]

writes into ``certs/``:

``ca.crt`` / ``ca.key``
    A self-signed test CA (``ca.key`` never leaves this machine). ``ca.crt`` goes
    to every SuperNode (``flower-supernode --root-certificates ca.crt``), to every
    ``flwr`` CLI user (``root-certificates`` in ``$FLWR_HOME/config.toml``) and to
    the SuperLink (``--ssl-ca-certfile``).
``server.pem`` / ``server.key``
    The SuperLink's TLS certificate, signed by the CA, with a SubjectAltName for
    every ``--hosts`` entry (IP addresses as ``IP:``, names as ``DNS:``) plus
    ``127.0.0.1`` and ``localhost`` (the SuperLink's own SuperExec connects to
    its Runtime API on loopback when it binds ``0.0.0.0``; ``--no-loopback`` to
    leave them out). ``flower-superlink --ssl-certfile server.pem --ssl-keyfile
    server.key``; the cloud detection service reuses the same pair
    (``python -m server.cloud --certfile server.pem --keyfile server.key``).
``node-<i>.key`` / ``node-<i>.pub``  (``i = 0 .. --nodes - 1``, the site index)
    SuperNode authentication keys in the formats Flower 1.41 reads: the private
    key in OpenSSH format (``flower-supernode --auth-supernode-private-key``
    loads it with ``load_ssh_private_key``), the public key as one OpenSSH line
    ``ecdsa-sha2-nistp384 AAAA... cedar-node-<i>`` (``flwr supernode register``
    loads it with ``load_ssh_public_key`` and accepts NIST EC curves only),
    i.e. what ``ssh-keygen -t ecdsa -b 384 -N ""`` writes.
``cloud.token`` (with ``--cloud-token``)
    A random bearer token for ``python -m server.cloud --token-file cloud.token``.

Private keys and the token are written with mode 0600. Existing files are kept
(reported as ``kept``) unless ``--force``: an existing CA is reused to sign a
new server certificate, and running again with a larger ``--nodes`` adds keys
for the new sites only.

These are *test* credentials for a small private deployment: a real one
should use the organisation's CA (or e.g. Let's Encrypt for the public name)
and keep ``ca.key`` offline.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
DEFAULT_DAYS = 365
PRIVATE_MODE = 0o600


@dataclass
class Credentials:
    """Paths of everything :func:`make_certs` wrote (or kept)."""

    out: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hosts: list[str]
    node_keys: list[Path] = field(default_factory=list)  # node-<i>.key, i = site index
    node_pubs: list[Path] = field(default_factory=list)  # node-<i>.pub
    token: Path | None = None
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


# ------------------------------------------------------------------ helpers
def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write ``data`` to ``path`` atomically; private files are 0600 from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, PRIVATE_MODE if private else 0o644)  # whatever the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _tls_key(kind: str):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    if kind == "ec":
        return ec.generate_private_key(ec.SECP384R1())
    raise ValueError(f"unknown TLS key type {kind!r} (ec or rsa)")


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def san_entries(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """``["127.0.0.1", "cloud.example.org"]`` -> ``[IPAddress(127.0.0.1), DNSName(cloud.example.org)]``."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip().strip("[]")  # "[::1]" -> "::1"
        if not host:
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host.lower()))
    return names


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        item = item.strip()
        if item and item.lower() not in {s.lower() for s in seen}:
            seen[item] = None
    return list(seen)


# ------------------------------------------------------------ certificates
def make_ca(days: int, common_name: str = "cedar test CA", key_type: str = "ec"):
    """A self-signed CA certificate (path length 0: it signs leaf certificates only) and its key."""
    key = _tls_key(key_type)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cedar"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew between machines
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_server_cert(ca_cert: x509.Certificate, ca_key, hosts: Sequence[str], days: int, key_type: str = "ec"):
    """A TLS server certificate for ``hosts`` (SubjectAltName: IPs and DNS names), signed by the CA."""
    sans = san_entries(hosts)
    if not sans:
        raise ValueError("at least one host name or IP address is needed for the server certificate")
    key = _tls_key(key_type)
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cedar"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=key_type == "rsa", data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def make_node_keys(comment: str) -> tuple[bytes, bytes]:
    """One SuperNode key pair: (OpenSSH private key, OpenSSH public key line), EC P-384."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" {comment}\n".encode()


# -------------------------------------------------------------------- main
def make_certs(out: Path | str, hosts: Sequence[str] = (), nodes: int = 2, days: int = DEFAULT_DAYS, *,
               loopback: bool = True, force: bool = False, cloud_token: bool = False,
               key_type: str = "ec") -> Credentials:
    """Create (or keep) the CA, the server certificate, ``nodes`` SuperNode key pairs and optionally a token."""
    if days < 1:
        raise ValueError("--days must be at least 1")
    if nodes < 0:
        raise ValueError("--nodes must be >= 0")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    hosts = _unique([*(LOOPBACK_HOSTS if loopback else ()), *hosts])
    creds = Credentials(out, out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key", hosts)

    def keep(*paths: Path) -> bool:
        if force or not all(p.exists() for p in paths):
            return False
        creds.kept.extend(paths)
        return True

    # CA: reused when both files exist (so new server certs / nodes chain to the same trust root)
    if keep(creds.ca_cert, creds.ca_key):
        ca_cert = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(creds.ca_key.read_bytes(), password=None)
    else:
        ca_cert, ca_key = make_ca(days, key_type=key_type)
        _write(creds.ca_key, _key_pem(ca_key), private=True)
        _write(creds.ca_cert, _cert_pem(ca_cert), private=False)
        creds.written += [creds.ca_cert, creds.ca_key]

    if not keep(creds.server_cert, creds.server_key):
        cert, key = make_server_cert(ca_cert, ca_key, hosts, days, key_type=key_type)
        _write(creds.server_key, _key_pem(key), private=True)
        _write(creds.server_cert, _cert_pem(cert), private=False)
        creds.written += [creds.server_cert, creds.server_key]

    for i in range(nodes):
        priv, pub = out / f"node-{i}.key", out / f"node-{i}.pub"
        creds.node_keys.append(priv)
        creds.node_pubs.append(pub)
        if not keep(priv, pub):
            private, public = make_node_keys(f"cedar-node-{i}")
            _write(priv, private, private=True)
            _write(pub, public, private=False)
            creds.written += [priv, pub]

    if cloud_token:
        creds.token = out / "cloud.token"
        if not keep(creds.token):
            _write(creds.token, (secrets.token_urlsafe(32) + "\n").encode(), private=True)
            creds.written.append(creds.token)
    return creds


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m server.make_certs", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the files (created)")
    p.add_argument("--hosts", nargs="*", default=[],
                   help="names and IP addresses the SuperLink / cloud service is reached at (SubjectAltName); "
                        "127.0.0.1 and localhost are always added unless --no-loopback")
    p.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs node-0 .. node-<N-1> (default 2)")
    p.add_argument("--days", type=int, default=DEFAULT_DAYS, help=f"validity (default {DEFAULT_DAYS})")
    p.add_argument("--key-type", choices=("ec", "rsa"), default="ec",
                   help="TLS keys: ec (P-384, default) or rsa (3072 bit); node keys are always EC P-384")
    p.add_argument("--cloud-token", action="store_true", help="also write cloud.token (random, mode 0600)")
    p.add_argument("--no-loopback", dest="loopback", action="store_false",
                   help="do not add 127.0.0.1 and localhost to the server certificate")
    p.add_argument("--force", action="store_true", help="overwrite existing files (a new CA!)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        creds = make_certs(args.out, args.hosts, args.nodes, args.days, loopback=args.loopback, force=args.force,
                           cloud_token=args.cloud_token, key_type=args.key_type)
    except (ValueError, OSError) as err:
        print(f"make_certs: {err}", file=sys.stderr)
        return 2
    for path in creds.written:
        print(f"wrote {path}")
    for path in creds.kept:
        print(f"kept  {path} (exists; --force to replace)")
    if creds.server_cert in creds.kept:
        cert = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
        try:
            names = [str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]
        except x509.ExtensionNotFound:
            names = []
        print(f"server certificate hosts (kept server.pem, --hosts not applied): {' '.join(names)}")
    else:
        print(f"server certificate hosts: {' '.join(creds.hosts)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
