"""No password, key or session token in any output, however the connection string is mistyped.

Passwords are drawn as random pieces ("Q" + letters and digits, so that no
piece can be mistaken for a percent escape or appear by chance) joined by
the characters people forget to escape: / + = @ : space %. Leaking any piece
counts, not only the whole password: a typo'd URI is often cut at a '/' or
an '@', and half a key is still a leak.
"""

from __future__ import annotations

import re
import string

from hypothesis import given, settings
from hypothesis import strategies as st

from cosmigrate.redact import describe_url, redact

SEPARATORS = "/+=@: %"

# (config key, template). Every one of them must fail when the config is loaded: a mistyped scheme, a
# password that is not percent-encoded, or credentials where none belong.
FORMS: list[tuple[str, str]] = [
    ("source.uri", "mongdb://acct:{pw}@cosmos.example:10255/?ssl=true"),
    ("source.uri", "mongodb:/acct:{pw}@cosmos.example:10255/?ssl=true"),
    ("source.uri", "mongodb//acct:{pw}@cosmos.example:10255/"),
    ("source.uri", "acct:{pw}@cosmos.example:27017"),
    ("source.uri", "mongodb://acct:{pw}@cosmos.example:10255/?ssl=true&replicaSet=globaldb"),
    ("source.uri", "mongdb://acct@cosmos.example/?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:{pw}"),
    ("target.uri", "mongodb+srv://acct:{pw}@docdb.example/?tls=true"),
    ("target.uri", "MONGODB://acct:{pw}@docdb.example:27017/"),
    ("target.uri", " mongodb://acct:{pw}@docdb.example:27017/"),
    ("target.uri", "https://acct:{pw}@docdb.example:27017/"),
    ("ledger.url", "dynamodb://AKIDEXAMPLE:{pw}@cosmigrate-ledger"),
    ("ledger.url", "mysql://acct:{pw}@db.example/ledger"),
    ("store.url", "s3://AKIDEXAMPLE:{pw}@bucket/prefix"),
]

piece = st.text(alphabet=string.ascii_letters + string.digits, min_size=5, max_size=9).map(lambda s: "Q" + s)


@st.composite
def passwords(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A password and its pieces; at least one separator needs escaping ('=' alone does not)."""
    pieces = draw(st.lists(piece, min_size=2, max_size=4))
    seps = [draw(st.text(alphabet=SEPARATORS, min_size=1, max_size=2)) for _ in pieces[1:]]
    if all(set(sep) <= {"="} for sep in seps):
        seps[0] = draw(st.sampled_from("/+@: %"))
    password = pieces[0] + "".join(sep + p for sep, p in zip(seps, pieces[1:], strict=True))
    return password, pieces


def _leaks(text: str, pieces: list[str]) -> list[str]:
    return [p for p in pieces if p in text]


# ---- in process: many examples, fast -------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(form=st.sampled_from(FORMS), secret=passwords())
def test_redact_and_describe_never_show_a_piece(form: tuple[str, str], secret: tuple[str, list[str]]) -> None:
    password, pieces = secret
    uri = form[1].format(pw=password)
    assert not _leaks(describe_url(uri), pieces), describe_url(uri)
    assert not _leaks(redact(uri), pieces), redact(uri)
    if re.match(r"\s*[A-Za-z][A-Za-z0-9+.-]*:?/", form[1]):  # in a message, only a scheme marks a URI across spaces
        message = f"source {uri.strip()} did not answer: connection refused"
        assert not _leaks(redact(message), pieces), redact(message)


def test_redact_keeps_what_is_not_secret() -> None:
    assert redact("mongodb://u:p%2Fw@h:10255/?ssl=true") == "mongodb://u:***@h:10255/?ssl=true"
    assert redact("mongodb://h:27017/?replicaSet=rs0 refused") == "mongodb://h:27017/?replicaSet=rs0 refused"
    assert redact("mongodb://h/?appName=me@corp") == "mongodb://h/?appName=me@corp"
    assert redact("x mongodb://a:b@c, mongodb://d:e f@g:1 x") == "x mongodb://a:***@g:1 x"  # too much, never too little
    assert redact("error: user a:b@c refused") == "error: user a:***@c refused"
    assert describe_url("mongdb://u:p/w@h.example:10255/?x=1") == \
        "mongdb://h.example:10255 (user, password, path and options not shown)"
    assert "secret" not in describe_url("mongdb://u:secret")  # no '@': user:secret looks like host:port
    assert describe_url("JustAKey==") == "a value without a scheme; the rest is not shown"
