"""Credential redaction: no password or secret may reach a log line, error or status."""

from __future__ import annotations

import re

# user:password@ in any URI-like string (mongodb://, https://, ...).
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@")
# key=value secrets in query strings or messages.
_SECRET_PARAM = re.compile(
    r"(?i)(?P<key>password|passwd|pwd|secret|token|aws_secret_access_key|x-amz-security-token|sig|signature)=(?P<val>[^&\s,;'\"]+)"
)


def redact(text: str) -> str:
    """Replace credentials in URIs and key=value pairs with `***`."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _SECRET_PARAM.sub(lambda m: f"{m['key']}=***", text)
