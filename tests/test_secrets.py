"""No password, key or session token in any output, however the connection string is mistyped.

Passwords are drawn as random pieces ("Q" + letters and digits, so that no
piece can be mistaken for a percent escape or appear by chance) joined by
the characters people forget to escape: / + = @ : space %. Leaking any piece
counts, not only the whole password: a typo'd URI is often cut at a '/' or
an '@', and half a key is still a leak.
"""

from __future__ import annotations

import asyncio
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cosmigrate.config import Config, ConfigError, load_config
from cosmigrate.redact import describe_url, redact
from cosmigrate.sandbox import Sandbox
from tests.helpers import child_env, make_config, prepare_backends, write_config

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


def _base(tmp_path: Path) -> Config:
    return make_config(tmp_path, "mongodb://127.0.0.1:9/", "mongodb://127.0.0.1:9/?retryWrites=false", "file+sqlite")


def _with(cfg: Config, key: str, value: str) -> Config:
    section, _, name = key.partition(".")
    setattr(getattr(cfg, section), name, value)
    return cfg


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


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(form=st.sampled_from(FORMS), secret=passwords())
def test_every_form_is_a_config_error_without_a_piece(tmp_path: Path, form: tuple[str, str],
                                                       secret: tuple[str, list[str]]) -> None:
    password, pieces = secret
    key, template = form
    path = write_config(_with(_base(tmp_path), key, template.format(pw=password)), tmp_path / "c.toml")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value).startswith(key), str(caught.value)
    assert not _leaks(str(caught.value), pieces), str(caught.value)


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


# ---- the real CLI: run, preflight and ctl on each form ------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cosmigrate", *args], capture_output=True, text=True, timeout=120,
                          env=child_env())


ISSUE_PASSWORD = ("Qk3yPart/Qsecond+Qthird==", ["Qk3yPart", "Qsecond", "Qthird"])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(form=st.sampled_from(FORMS), secret=passwords())
@example(form=FORMS[0], secret=ISSUE_PASSWORD)  # mongdb://user:pa/ss@host
@example(form=FORMS[1], secret=ISSUE_PASSWORD)  # mongodb:/user:pw@host
@example(form=FORMS[3], secret=ISSUE_PASSWORD)  # user:pw@host:27017
@example(form=FORMS[4], secret=("Qpass Qword", ["Qpass", "Qword"]))  # a password with a space
@example(form=FORMS[5], secret=ISSUE_PASSWORD)  # AWS_SESSION_TOKEN in authMechanismProperties
@example(form=FORMS[10], secret=ISSUE_PASSWORD)  # dynamodb://key:secret@table
def test_the_cli_never_prints_a_piece(tmp_path: Path, form: tuple[str, str], secret: tuple[str, list[str]]) -> None:
    password, pieces = secret
    key, template = form
    config = str(write_config(_with(_base(tmp_path), key, template.format(pw=password)), tmp_path / "c.toml"))

    async def all_three() -> list[subprocess.CompletedProcess[str]]:
        return list(await asyncio.gather(*(asyncio.to_thread(_cli, *args) for args in (
            ("run", "--config", config), ("preflight", "--config", config), ("ctl", "--config", config, "status")))))

    for result in asyncio.run(all_three()):
        output = result.stdout + result.stderr
        assert not _leaks(output, pieces), output
        assert "Traceback" not in output, output
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        if result.args[3] == "ctl":
            # ctl reads only control.socket (it never resolves or checks a connection string): no daemon here.
            assert result.returncode == 1 and "no cosmigrate daemon is running" in result.stderr, output
        else:
            assert result.returncode == 2 and key in result.stderr, output


async def test_a_session_token_in_a_valid_uri_is_redacted_when_the_source_refuses(tmp_path: Path, sandbox: Sandbox) -> None:
    """The config is fine; the daemon quotes the source URI when the source fails at start-up."""
    token = "QFwoGZXIvYXdzEXAMPLE%2FQtokenTail%2B%3D%3D"
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    await prepare_backends(cfg)
    cfg.source.uri += f"&authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:{token}"
    config = str(write_config(cfg, tmp_path / "c.toml"))
    result = await asyncio.to_thread(_cli, "run", "--config", config)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "AWS_SESSION_TOKEN:***" in result.stderr, output
    assert not _leaks(output, ["QFwoGZXIvYXdzEXAMPLE", "QtokenTail"]), output


def test_a_driver_warning_that_would_quote_a_token_is_a_config_error(tmp_path: Path) -> None:
    # The driver takes this string, warns about the unknown property "Qpiece7" on stderr each time a client
    # is built (outside any redaction), and drops it: a session token cut at a ',' would reach the journal.
    uri = ("mongodb://cosmos.example:10255/?ssl=true&authMechanism=MONGODB-AWS"
           "&authMechanismProperties=AWS_SESSION_TOKEN:Qtoken1,Qpiece7:x")
    path = write_config(_with(_base(tmp_path), "source.uri", uri), tmp_path / "c.toml")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value).startswith("source.uri: not a valid connection string")
    assert not _leaks(str(caught.value), ["Qtoken1", "Qpiece7"])
