"""Credential redaction: no password or secret may reach a log line, error or status.

Two tools, for two situations:

* `redact(text)` scrubs free text (log records, error messages) that may
  quote a connection string somewhere inside it. It has to guess where a
  password ends, and it guesses wide: passwords are typed by people and hold
  `/`, `@`, `:` and spaces that were never percent-encoded, and a scheme may
  be mistyped (`mongodb:/`, `mongdb://`) or missing (`user:pw@host:27017`).
  Hiding a little too much of a message is better than showing a key.
* `describe_url(url)` is for echoing a configured URL back to the operator
  (config errors): the scheme and the host as typed, and nothing else: no
  user, no password, no path, no query (query values such as
  `authMechanismProperties=AWS_SESSION_TOKEN:...` hold secrets too).
"""

from __future__ import annotations

import re

# Where credentials may start: a token (after start, space, quote, bracket, '=' or ',') with an optional
# scheme typed with one or more slashes (mongodb://, mongodb:/, s3://), then a user name, then ':'.
# Without a scheme, "name:/" is a scheme typed wrong, not a user name.
_LEAD = re.compile(r"""(?<![^\s'"(\[<=,])(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*:/+)?(?P<user>[^\s:@'"]*):(?(scheme)|(?!/))""")
_SPACE = re.compile(r"\s")
# key=value secrets in query strings or messages.
_SECRET_PARAM = re.compile(
    r"(?i)(?P<key>password|passwd|pwd|secret|token|aws_secret_access_key|x-amz-security-token|sig|signature)=(?P<val>[^&\s,;'\"]+)"
)
# MONGODB-AWS temporary credentials inside authMechanismProperties (KEY:value pairs, maybe percent-encoded).
# The value runs to the next option or the end of the line: a pasted token may hold a stray space.
_SESSION_TOKEN = re.compile(r"(?i)(?P<key>AWS_SESSION_TOKEN(?::|%3A))(?P<val>[^&,'\"\n]+)")


def _credentials_end(text: str, lead: re.Match[str]) -> int | None:
    """Index of the '@' that ends the password begun by `lead`, or None when no password follows it.

    A password may hold '@', '/', '?', spaces, even something that looks like the next URI, so the last
    '@' wins: for a lead with a scheme (or a '/' that says one was meant: `mongodb//user:`), or one that
    starts the text (a bare connection string), the last '@' on the line; for a scheme-less `word:`
    inside a message, the last '@' of its own token.
    """
    start = lead.end()
    line_end = text.find("\n", start)
    line_end = len(text) if line_end == -1 else line_end
    bare = not text[: lead.start()].strip(" \t'\"") and not text[start : start + 1].isspace()  # "user:pw...", not "error: ..."
    if lead["scheme"] or "/" in lead["user"] or bare:
        end = line_end  # two URIs on one line may merge into one redaction: too much hidden, never too little
    else:
        space = _SPACE.search(text, start, line_end)
        end = space.start() if space else line_end
    at = text.rfind("@", start, end)
    return None if at == -1 else at


def _redact_userinfo(text: str) -> str:
    if "@" not in text:
        return text
    out: list[str] = []
    copied = 0  # text[:copied] is in `out`
    scan = 0
    while (lead := _LEAD.search(text, scan)) is not None:
        at = _credentials_end(text, lead)
        if at is None:
            scan = lead.end()
            continue
        out.append(text[copied : lead.end()])
        out.append("***")
        copied = scan = at
    out.append(text[copied:])
    return "".join(out)


def redact(text: str) -> str:
    """Replace passwords in URIs, key=value secrets and AWS session tokens with `***`."""
    text = _redact_userinfo(text)
    text = _SESSION_TOKEN.sub(lambda m: f"{m['key']}***", text)
    return _SECRET_PARAM.sub(lambda m: f"{m['key']}=***", text)


_SCHEME = re.compile(r"\s*(?P<scheme>[A-Za-z][A-Za-z0-9+.-]{0,19}:/+)")
_HOSTS = re.compile(r"[A-Za-z0-9._\-\[\]:,]{1,255}")
_ONE_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::[0-9]{1,5})?")


def _plausible_hosts(hosts: str) -> bool:
    """host[:port][,host[:port]...] with numeric ports: what is left of a typo'd URI is often not a host."""
    return all(_ONE_HOST.fullmatch(host) for host in hosts.split(","))


def _host_part(rest: str, need_at: bool) -> str | None:
    """The host list after the userinfo (after the last '@'), if it looks like one."""
    at = rest.rfind("@")
    if at >= 0:
        before = rest[:at]
        query = before.find("?")
        if query >= 0 and "=" in before[query:]:
            return None  # the '@' sits in a query value: no telling where the host is
        rest = rest[at + 1 :]
    elif need_at:
        return None  # no scheme and no '@': this may be a bare password, show nothing of it
    m = _HOSTS.match(rest)
    if m is None or rest[m.end() : m.end() + 1] not in ("", "/", "?", "#") or not _plausible_hosts(m.group()):
        return None
    return m.group()


def describe_url(url: str) -> str:
    """The scheme and host of a URL as typed, for error messages; never user, password, path or query."""
    m = _SCHEME.match(url)
    if m is None:
        host = _host_part(url.strip(), need_at=True)
        return f"a value without a scheme{f' (host {host})' if host else ''}; the rest is not shown"
    host = _host_part(url[m.end() :], need_at=False)
    if host is None:
        return f"{m['scheme']}... (no recognisable host; the rest is not shown)"
    return f"{m['scheme']}{host} (user, password, path and options not shown)"
