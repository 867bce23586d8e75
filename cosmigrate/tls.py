"""Whether a connection will be encrypted and its server verified, as the driver will decide it.

DocumentDB clusters serve TLS with Amazon's CA bundle, and the target
connection carries the DocumentDB user's password and every migrated
document. So the target must use TLS with the certificate and the host name
verified, unless the operator opts out (`target.allow_insecure_tls = true`,
shown in status and logged at every start).

The state is read from the connection string's options as PyMongo parses
them (`pymongo.uri_parser.split_options`: `ssl` is an alias of `tls`,
`tlsInsecure` expands into the two `tlsAllowInvalid*` options), with the
driver's own rules for what implies TLS: a `mongodb+srv://` string (unless
it says `tls=false`), a `tlsCAFile` (in the string, or `target.tls_ca_file`,
which cosmigrate passes as `tlsCAFile`), or another TLS file option. Never by
looking for `tls=true` in the text: `TLS=True`, `ssl=true` and
`tlsInsecure=true` all mean something.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from pymongo.errors import PyMongoError
from pymongo.uri_parser import split_options

# Options whose non-empty value turns TLS on (pymongo.client_options._parse_ssl_options).
_TLS_FILES = ("tlscafile", "tlscertificatekeyfile", "tlscertificatekeyfilepassword", "tlscrlfile")
# Options that switch a verification off when true, and turn TLS on when given at all.
_VERIFICATION = ("tlsinsecure", "tlsallowinvalidcertificates", "tlsallowinvalidhostnames")


@dataclass(frozen=True)
class TlsState:
    enabled: bool
    verified: bool
    problem: str = ""  # what is wrong, for a config error or a warning; never a piece of the connection string

    @property
    def secure(self) -> bool:
        return self.enabled and self.verified


def connection_tls(uri: str, tls_ca_file: str = "") -> TlsState:
    """The TLS state of a client built from `uri` (and `tls_ca_file` passed as tlsCAFile)."""
    srv = uri.startswith("mongodb+srv://")
    query = uri.partition("://")[2].partition("?")[2]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown options: the config loader reports what matters
            options: Any = split_options(query, validate=True, warn=True, normalize=True) if query else {}
    except (PyMongoError, ValueError, TypeError, OSError):  # OSError: a tlsCAFile that cannot be read
        return TlsState(False, False, "the connection string's TLS options cannot be read")
    if "tls" in options:
        enabled = bool(options["tls"])
    else:
        enabled = (srv or bool(tls_ca_file) or any(options.get(k) for k in _TLS_FILES)
                   or any(k in options for k in _VERIFICATION))
    if not enabled:
        said = "tls=false" if "tls" in options else "neither tls=true, tlsCAFile nor mongodb+srv://"
        return TlsState(False, False, f"TLS is off ({said})")
    typed: tuple[str, ...] = ("tlsinsecure",) if options.get("tlsinsecure") is True else _VERIFICATION  # not its expansion
    off = [f"{_cased(options, k)}=true" for k in typed if options.get(k) is True]
    if off:
        return TlsState(True, False, f"certificate verification is off ({', '.join(off)})")
    return TlsState(True, True)


def _cased(options: Any, key: str) -> str:
    """An option's name as the operator typed it (PyMongo's options keep their original case)."""
    try:
        return str(options.cased_key(key))
    except (AttributeError, KeyError):
        return key
