"""Throw-away TLS certificates and SuperNode keys for a Flower deployment (``fisherguard flower-keys``).

What flwr 1.42 expects (docs/flower.md §3, "TLS and SuperNode authentication"):

- the SuperLink serves HTTPS with ``--ssl-ca-certfile ca.crt --ssl-certfile server.pem
  --ssl-keyfile server.key``; the certificate must name the address the SuperNodes, ``flwr`` and
  the SuperLink's own ``flower-superexec`` dial (127.0.0.1 on one machine) as a subjectAltName;
- SuperNodes and ``flwr`` check it against ``ca.crt`` (``--root-certificates`` and the
  connection's ``root-certificates``);
- with ``--enable-supernode-auth`` a SuperNode signs its requests with an EC key on a NIST curve
  in OpenSSH format (``--auth-supernode-private-key node-0``); its public half (``node-0.pub``)
  must first be registered with ``flwr supernode register node-0.pub CONNECTION``.

The CA's private key is not kept: nothing else can ever be signed with this CA. The same files
can be made with openssl and ssh-keygen (the README's deployment recipe shows the commands).
Uses ``cryptography``, which flwr already depends on.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class DeploymentKeys:
    """Paths of the files ``make_keys`` wrote."""

    directory: Path
    ca_cert: Path  # the CA certificate: --ssl-ca-certfile, --root-certificates, root-certificates
    server_cert: Path  # --ssl-certfile
    server_key: Path  # --ssl-keyfile
    nodes: tuple[Path, ...]  # SuperNode private keys (--auth-supernode-private-key); public: + ".pub"

    @staticmethod
    def public(private: Path) -> Path:
        return private.with_name(private.name + ".pub")


def _write(path: Path, data: bytes, private: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL  # never overwrite a key
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def node_key_names(nodes: int, prefix: str = "node") -> list[str]:
    return [f"{prefix}-{i}" for i in range(nodes)]


def make_node_key(path: Path, comment: str | None = None) -> Path:
    """An ECDSA P-384 key pair in OpenSSH format: ``path`` (private, mode 600) and ``path.pub``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH)
    _write(path, priv, private=True)
    _write(DeploymentKeys.public(path), pub + f" {comment or path.name}\n".encode(), private=False)
    return path


def make_keys(directory: str | Path, nodes: int, *, hosts: tuple[str, ...] = DEFAULT_HOSTS,
              days: int = 365, prefix: str = "node") -> DeploymentKeys:
    """Write a throw-away CA (``ca.crt``), a SuperLink certificate for ``hosts`` (``server.pem``,
    ``server.key``) and ``nodes`` SuperNode key pairs (``node-<i>``, ``node-<i>.pub``) into
    ``directory``; refuses to overwrite any file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if nodes < 0:
        raise ValueError(f"nodes must be >= 0, got {nodes}")
    if not hosts:
        raise ValueError("the SuperLink certificate needs at least one host (IP address or name)")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    names = ["ca.crt", "server.pem", "server.key"]
    for n in node_key_names(nodes, prefix):
        names += [n, n + ".pub"]
    clash = [n for n in names if (d / n).exists()]
    if clash:
        raise ValueError(f"{d} already holds {', '.join(clash)}; choose an empty directory")

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fisherguard deployment CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA384()))

    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
           .issuer_name(ca_name).public_key(srv_key.public_key())
           .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
           .add_extension(x509.SubjectAlternativeName(sans), critical=False)
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
           .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                          critical=False)
           .sign(ca_key, hashes.SHA384()))
    pem = serialization.Encoding.PEM
    _write(d / "ca.crt", ca.public_bytes(pem), private=False)
    _write(d / "server.pem", srv.public_bytes(pem), private=False)
    _write(d / "server.key", srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()), private=True)
    node_paths = tuple(make_node_key(d / n) for n in node_key_names(nodes, prefix))
    return DeploymentKeys(d, d / "ca.crt", d / "server.pem", d / "server.key", node_paths)
