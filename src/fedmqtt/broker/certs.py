"""Certificates for the Mosquitto TLS listener: a private CA, a server certificate it signed, and client
certificates it issues to devices (and to the coordinator and watcher accounts) for ``--client-certs``.

A client certificate's common name is the account's name (a device id, ``coordinator`` or ``watcher``):
Mosquitto with ``use_identity_as_username`` makes it the user name, so the generated ACL (``%u``) keys on it.

Made with the ``openssl`` binary (the ``cryptography`` package is not a fedmqtt dependency). These are for
testing and private networks; production users bring certificates from their own CA.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedmqtt.broker.errors import CertificateError, MissingTool

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
CLIENTS_DIR = "clients"  # inside the TLS directory: NAME.crt and NAME.key per client


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of a TLS set-up: clients need ``ca_cert``; the broker needs ``server_cert`` and
    ``server_key``."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, tls_dir: Path) -> TlsFiles:
        return cls(tls_dir / "ca.crt", tls_dir / "ca.key", tls_dir / "server.crt", tls_dir / "server.key")

    def exist(self) -> bool:
        return self.ca_cert.exists() and self.server_cert.exists() and self.server_key.exists()


@dataclass(frozen=True)
class ClientCertificate:
    """A client's certificate (common name = ``name``) and its private key, and the CA that signed it."""

    name: str
    cert: Path
    key: Path
    ca_cert: Path

    @classmethod
    def in_dir(cls, tls_dir: Path, name: str) -> ClientCertificate:
        return cls(name, tls_dir / CLIENTS_DIR / f"{name}.crt", tls_dir / CLIENTS_DIR / f"{name}.key",
                   tls_dir / "ca.crt")  # fmt: skip


def _openssl() -> str:
    found = shutil.which("openssl")
    if found is None:
        raise MissingTool("openssl", "it makes the test certificates; install it (Debian: apt install openssl)")
    return found


def _run(args: list[str]) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise CertificateError(f"{' '.join(args[:3])} ... failed: {(result.stderr or result.stdout).strip()}")


def _san(hosts: tuple[str, ...]) -> str:
    entries = []
    for host in hosts:
        try:
            ipaddress.ip_address(host)
            entries.append(f"IP:{host}")
        except ValueError:
            entries.append(f"DNS:{host}")
    return ",".join(entries)


_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def issue_client_certificate(tls_dir: Path, name: str, *, days: int = 825, force: bool = False) -> ClientCertificate:
    """Issue ``tls_dir/clients/NAME.crt`` and ``NAME.key`` (EC P-256, common name ``name``, client
    authentication only), signed by the CA in ``tls_dir`` (made by :func:`generate_test_certificates`). ``name``
    must be a valid account name: check it with :func:`fedmqtt.broker.accounts.username_for` first (the common
    name becomes the MQTT user name). Refuses to overwrite existing files unless ``force``."""
    files = TlsFiles.in_dir(tls_dir)
    issued = ClientCertificate.in_dir(tls_dir, name)
    missing = [p for p in (files.ca_cert, files.ca_key) if not p.exists()]
    if missing:
        raise CertificateError(
            f"{missing[0]} does not exist: client certificates are issued by the CA that `fedmqtt broker "
            f"gen-certs` makes in {tls_dir} (run it first, without --device); with your own CA, issue them with it"
        )
    existing = [p for p in (issued.cert, issued.key) if p.exists()]
    if existing and not force:
        raise CertificateError(f"{existing[0]} already exists; pass --force to issue a new certificate for {name}")
    openssl = _openssl()
    issued.cert.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(issued.cert.parent, 0o700)  # keys live here
    old_umask = os.umask(0o077)
    try:
        with tempfile.TemporaryDirectory(dir=issued.cert.parent) as work_dir:
            work = Path(work_dir)
            csr = work / "client.csr"
            key = work / "client.key"
            # The subject is passed as one argument; validated account names hold no '/' or '=' to escape.
            _run([openssl, "req", "-new", *_EC, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}"])
            extensions = work / "client.ext"
            extensions.write_text(
                "basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\n"
                "extendedKeyUsage=clientAuth\n"
                "subjectKeyIdentifier=hash\n"
                "authorityKeyIdentifier=keyid,issuer\n"
            )
            cert = work / "client.crt"
            _run(
                [openssl, "x509", "-req", "-in", str(csr), "-CA", str(files.ca_cert), "-CAkey", str(files.ca_key),
                 "-CAcreateserial", "-CAserial", str(work / "ca.srl"), "-out", str(cert), "-days", str(days),
                 "-extfile", str(extensions)]
            )  # fmt: skip
            os.chmod(cert, 0o644)
            os.chmod(key, 0o600)
            os.replace(key, issued.key)
            os.replace(cert, issued.cert)
    finally:
        os.umask(old_umask)
    return issued


def generate_test_certificates(
    tls_dir: Path, *, hosts: tuple[str, ...] = DEFAULT_HOSTS, days: int = 825, force: bool = False
) -> TlsFiles:
    """Write ca.crt/ca.key/server.crt/server.key (EC P-256) into ``tls_dir``; keys are readable by the owner
    only. Refuses to overwrite existing files unless ``force``."""
    files = TlsFiles.in_dir(tls_dir)
    if not hosts:
        raise CertificateError("the server certificate needs at least one host name or IP address")
    existing = [p for p in (files.ca_cert, files.ca_key, files.server_cert, files.server_key) if p.exists()]
    if existing and not force:
        raise CertificateError(f"{existing[0]} already exists; pass --force to replace the certificates in {tls_dir}")
    openssl = _openssl()
    tls_dir.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o077)  # keys are created private, not chmod-ed after the fact
    try:
        with tempfile.TemporaryDirectory(dir=tls_dir) as work_dir:
            work = Path(work_dir)
            ec = _EC
            _run(
                [openssl, "req", "-x509", *ec, "-keyout", str(files.ca_key), "-out", str(files.ca_cert),
                 "-days", str(days), "-subj", "/CN=fedmqtt test CA",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign"]
            )  # fmt: skip
            csr = work / "server.csr"
            _run(
                [openssl, "req", "-new", *ec, "-keyout", str(files.server_key), "-out", str(csr),
                 "-subj", f"/CN={hosts[0]}"]
            )  # fmt: skip
            extensions = work / "server.ext"
            extensions.write_text(
                "basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n"
                f"subjectAltName={_san(hosts)}\n"
                "subjectKeyIdentifier=hash\n"
                "authorityKeyIdentifier=keyid,issuer\n"
            )
            _run(
                [openssl, "x509", "-req", "-in", str(csr), "-CA", str(files.ca_cert), "-CAkey",
                 str(files.ca_key), "-CAcreateserial", "-CAserial", str(work / "ca.srl"),
                 "-out", str(files.server_cert), "-days", str(days), "-extfile", str(extensions)]
            )  # fmt: skip
    finally:
        os.umask(old_umask)
    os.chmod(files.ca_cert, 0o644)
    os.chmod(files.server_cert, 0o644)
    os.chmod(files.ca_key, 0o600)
    os.chmod(files.server_key, 0o600)
    return files
