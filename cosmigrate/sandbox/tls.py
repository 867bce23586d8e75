"""TLS for the DocumentDB emulator, as DocumentDB serves it: a certificate from a CA the client must be given.

At start the emulator makes a throw-away CA and a server certificate for its
address (EC P-256: a handshake costs little), keeps the private keys in a
private temporary directory, and publishes the CA certificate where clients
find it: `ca_file_for(host, port)`, a path derived from the address alone, so
a helper that only holds the target's URI (the test suite's `make_config`)
finds the CA too, the way an operator downloads DocumentDB's CA bundle.

Needs the `cryptography` package (installed with the `test` extra).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import ssl
import stat
import tempfile
from pathlib import Path
from urllib.parse import urlsplit


class SandboxTlsError(Exception):
    """The emulator cannot serve TLS (the message says why)."""


def ca_dir() -> Path:
    """Where the running emulators publish their CA certificates (one directory per user)."""
    return Path(tempfile.gettempdir()) / f"cosmigrate-sandbox-{os.getuid()}"


def ca_file_for(host: str, port: int) -> Path:
    return ca_dir() / f"target-{host}-{port}-ca.pem"


def ca_file_for_uri(uri: str) -> str:
    """The CA file of the emulator a `mongodb://host:port/...` URI points at; "" when there is none."""
    try:
        parts = urlsplit(uri)
        host, port = parts.hostname, parts.port
    except ValueError:
        return ""
    if not host or not port:
        return ""
    path = ca_file_for(host, port)
    return str(path) if path.is_file() else ""


def _own_directory(path: Path, mode: int) -> None:
    """Create `path` (or accept it) only as a real directory of this user: /tmp is shared."""
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise SandboxTlsError(f"{path} exists and is not a directory of this user; remove it")


class ServerTls:
    """A CA, a server certificate for `host`, and the server-side SSL context that serves it."""

    def __init__(self, host: str) -> None:
        try:
            from cryptography import x509
            from cryptography.hazmat.primitives import hashes, serialization
            from cryptography.hazmat.primitives.asymmetric import ec
            from cryptography.x509.oid import NameOID
        except ImportError:
            raise SandboxTlsError("the DocumentDB emulator's TLS needs the cryptography package "
                                  "(pip install 'cosmigrate[test]')") from None
        now = dt.datetime.now(dt.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cosmigrate sandbox CA")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
              .not_valid_after(now + dt.timedelta(days=30))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                           content_commitment=False, key_encipherment=False, data_encipherment=False,
                                           key_agreement=False, encipher_only=False, decipher_only=False),
                             critical=True)
              .sign(ca_key, hashes.SHA256()))
        names: list[x509.GeneralName] = [x509.DNSName("localhost")]
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])).issuer_name(ca_name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        self.ca_pem = ca.public_bytes(serialization.Encoding.PEM)
        self._private = Path(tempfile.mkdtemp(prefix="cosmigrate-sandbox-key-"))  # 0700
        chain, key_file = self._private / "server.pem", self._private / "server.key"
        chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(chain, key_file)
        self.ca_file: Path | None = None

    def publish(self, host: str, port: int) -> Path:
        """Write the CA certificate where clients of host:port look for it (public: it is a certificate)."""
        _own_directory(ca_dir(), 0o755)
        path = ca_file_for(host, port)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(self.ca_pem)
        tmp.chmod(0o644)
        os.replace(tmp, path)  # replaces a stale file of an emulator that was killed, never follows a link
        self.ca_file = path
        return path

    def close(self) -> None:
        if self.ca_file is not None:
            self.ca_file.unlink(missing_ok=True)
            self.ca_file = None
        shutil.rmtree(self._private, ignore_errors=True)
