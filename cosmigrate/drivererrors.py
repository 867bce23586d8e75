"""A driver error as an operator reads it: one line, without PyMongo's topology dump, and what to do.

`preflight` and `run`'s first contact give the same line and the same advice, so the set-up problem reads the
same wherever it is met. The advice is chosen from the error's words (refused, unresolvable, certificate,
authentication, timeout); the text is redacted first, so no password leaves.
"""

from __future__ import annotations

from cosmigrate.redact import redact

FIRST_CONTACT_S = 8.0
"""How long the first contact with a server may take before it is reported (the daemon's own clients keep their
longer selection timeouts for the failovers they ride out later)."""

_DUMP_MARKERS = (", Timeout:", " (configured timeouts", ", Topology Description:", "Topology Description:")

_ADVICE = (
    (("certificate verify failed", "certificate_verify_failed", "hostname mismatch", "doesn't match",
      "ssl handshake", "tlsv1 alert", "wrong version number"),
     "the TLS handshake failed: for the target set target.tls_ca_file to the DocumentDB CA bundle "
     "(global-bundle.pem) and connect by the cluster's own endpoint name"),
    (("authentication failed", "auth failed", "authenticationfailed", "bad auth", "unauthorized"),
     "the server refused the credentials: check the user and password in {role}.uri (or its secret)"),
    (("name or service not known", "nodename nor servname", "getaddrinfo failed", "no address associated",
      "temporary failure in name resolution", "dns"),
     "the host name does not resolve: check the host in {role}.uri and this machine's DNS"),
    (("connection refused", "errno 111"),
     "nothing listens there: check the host and port in {role}.uri (Cosmos DB: 10255, DocumentDB: 27017)"),
    (("timed out", "timeout"),
     "no answer: check the network path ({role}'s firewall or security group, this instance's egress)"),
)


def error_line(exc: BaseException, limit: int = 300) -> str:
    """The error's first line, redacted, cut before the driver's timeouts and topology description."""
    text = redact(str(exc) or exc.__class__.__name__).splitlines()[0] if str(exc) else exc.__class__.__name__
    for marker in _DUMP_MARKERS:
        text = text.split(marker, 1)[0]
    return text.strip().rstrip(",")[:limit]


def advice(role: str, exc: BaseException) -> str:
    """What to do about a connection error of `role` ("source" or "target"), or "" when the words say nothing."""
    text = str(exc).lower()
    for words, todo in _ADVICE:
        if any(w in text for w in words):
            return todo.format(role=role)
    return ""


def is_tls_failure(exc: BaseException) -> bool:
    """Did the connection fail in the TLS handshake (so TLS is not verified, whatever the settings say)?"""
    return advice("target", exc) == _ADVICE[0][1]


def first_contact_error(role: str, uri: str, exc: BaseException) -> str:
    """`run`'s one line when a server does not answer at start: the same words and advice as preflight."""
    todo = advice(role, exc)
    return f"{role} {redact(uri)} did not answer: {error_line(exc)}" + (f" -> {todo}" if todo else "")
