"""Configuration: one TOML file, environment overrides, strict validation.

Every key has a default documented in the README. A wrong key, type or value
fails start-up with one line naming the key (`ConfigError`), never a
traceback. Environment variables override the file as
`COSMIGRATE_<SECTION>_<KEY>` (e.g. `COSMIGRATE_SOURCE_URI`); the old recipe's
`SOURCE_URI` and `S3_CHANGE_FEED_BUCKET_NAME` are still honoured. When
`aws.region` is empty, `AWS_REGION`, `AWS_DEFAULT_REGION` and the AWS profile
supply it (botocore itself ignores `AWS_REGION`).

Errors never echo a secret: a URL is shown as its scheme and host only
(`redact.describe_url`), and PyMongo's own complaints about a connection
string are dropped when they would quote a piece of the password.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cosmigrate.redact import describe_url, redact
from cosmigrate.tls import connection_tls


class ConfigError(ValueError):
    """A configuration problem, phrased as one line that names the key."""


@dataclass
class SourceConfig:
    uri: str = ""


@dataclass
class TargetConfig:
    uri: str = ""
    tls_ca_file: str = ""
    allow_insecure_tls: bool = False


@dataclass
class StoreConfig:
    url: str = "file:///var/lib/cosmigrate/batches"
    sse: str = "AES256"
    kms_key_id: str = ""
    retention_hours: float = 24.0


@dataclass
class LedgerConfig:
    url: str = "sqlite:///var/lib/cosmigrate/ledger.db"


@dataclass
class AwsConfig:
    region: str = ""
    endpoint_url: str = ""


@dataclass
class ControlConfig:
    socket: str = "/run/cosmigrate/control.sock"
    allowed_group: str = ""
    max_request_bytes: int = 65536


@dataclass
class ApplyConfig:
    pool_size: int = 4
    max_batches_per_round: int = 8
    collapse_max_bytes: int = 128 * 1024 * 1024
    max_ops_per_write: int = 5000
    max_bytes_per_write: int = 8 * 1024 * 1024
    write_concurrency: int = 8
    """Bulk writes of one namespace in flight at once: peers size insert workers at 2 x the target's vCPUs (PCSM,
    AWS's mongorestore runbook); 8 fits a 4-vCPU DocumentDB instance. Every document appears once per write run,
    so concurrent chunks never race on one document; runs are written one after the other."""
    poll_interval_s: float = 0.5
    cutover_threshold_seconds: float = 10.0
    write_bound_s: float = 10.0
    """Every target write carries this as maxTimeMS and socket timeout: the target fence (docs/design.md)."""


@dataclass
class CaptureConfig:
    start_at: str = "beginning"
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    max_batch_events: int = 5000
    max_batch_bytes: int = 8 * 1024 * 1024
    max_batch_age_s: float = 1.0
    min_batch_age_s: float = 0.1
    max_unflushed_bytes: int = 64 * 1024 * 1024
    max_unflushed_bytes_total: int = 256 * 1024 * 1024
    discovery_interval_s: float = 60.0
    deletes_preview: bool = False
    max_await_ms: int = 500
    idle_poll_max_s: float = 5.0
    """The longest pause between polls of an idle stream (0: none); a head sample it has not reached ends it."""
    head_sample_interval_s: float = 2.0
    head_sample_max_per_s: float = 250.0
    """The periodic sampler's pace at most (samples a second): with more namespaces, its round gets longer."""
    head_sample_concurrency: int = 32
    per_partition: bool = True


@dataclass
class DeletesConfig:
    enabled: bool = True
    detect_preview: bool = True
    interval_s: float = 5.0
    max_source_share: float = 0.2
    page_size: int = 1000


@dataclass
class VerifyConfig:
    enabled: bool = False
    page_size: int = 1000
    interval_s: float = 3600.0
    max_source_share: float = 0.2
    max_mismatches: int = 100


@dataclass
class CutoverConfig:
    quiesce_s: float = 5.0
    precheck_timeout_s: float = 60.0
    recheck_rounds: int = 5


@dataclass
class DaemonConfig:
    drain_timeout_s: float = 30.0
    status_interval_s: float = 5.0
    lock_file: str = ""  # "": <ledger dir>/<cluster>.lock next to a SQLite ledger (see cosmigrate.lock)
    worker: str = ""
    """This worker's name on its host ("" = the only one): its lock file and control socket get it as a suffix."""


@dataclass
class LeasesConfig:
    """Workers share a cluster's units through leases in the ledger (`cosmigrate.leases`)."""

    lease_s: float = 30.0
    renew_s: float = 10.0
    balance_s: float = 15.0


@dataclass
class LogConfig:
    level: str = "info"
    format: str = "auto"
    progress_interval_s: float = 60.0


@dataclass
class MetricsConfig:
    listen: str = ""  # "host:port" of the Prometheus text endpoint; off when empty
    cloudwatch: bool = False
    cloudwatch_interval_s: float = 60.0
    cloudwatch_namespace: str = "cosmigrate"


@dataclass(frozen=True)
class TtlDecision:
    """The operator's choice for a namespace whose source expires documents by `_ts` (DocumentDB cannot).

    `none`: the target keeps documents without expiry. `field`: the target expires them by a date field the
    application writes (`path`), `seconds` after its value: a DocumentDB TTL index built without its expiry
    during the migration and given `expireAfterSeconds` at cutover, like every other TTL index."""

    kind: str
    """`none` or `field`."""
    path: str = ""
    seconds: int = 0

    def text(self) -> str:
        """The decision as written in `[ttl]`."""
        return "none" if self.kind == "none" else f"field:{self.path}:{self.seconds}"


TTL_FORMS = '"none" or "field:<date field>:<expireAfterSeconds>"'
MAX_EXPIRE_AFTER = 2_147_483_647  # MongoDB's and DocumentDB's bound of expireAfterSeconds


def parse_ttl_decision(ns: str, value: Any) -> TtlDecision:
    """One `[ttl]` entry, or a ConfigError naming it (namespace `db.collection`, value in one of TTL_FORMS)."""
    key = f"[ttl] {json.dumps(ns)}"
    db, dot, coll = ns.partition(".")
    if not (db and dot and coll):
        raise ConfigError(f"{key}: the key must be a namespace db.collection (quoted: \"app.sessions\" = \"none\")")
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected {TTL_FORMS}, got {value!r}")
    if value == "none":
        return TtlDecision("none")
    kind, _, rest = value.partition(":")
    path, _, seconds = rest.rpartition(":")
    if kind != "field" or not path or not seconds:
        raise ConfigError(f"{key}: expected {TTL_FORMS}, got {value!r}")
    if path.startswith("$") or path == "_id" or path == "_ts" or "" in path.split(".") or "\0" in path:
        raise ConfigError(f"{key}: {path!r} is not a date field the documents hold (not _id, _ts, or starting with $)")
    if not seconds.isdigit() or int(seconds) > MAX_EXPIRE_AFTER:
        raise ConfigError(f"{key}: expireAfterSeconds must be a whole number from 0 to {MAX_EXPIRE_AFTER}, "
                          f"got {seconds!r}")
    return TtlDecision("field", path, int(seconds))


@dataclass
class Config:
    cluster_name: str = ""
    source: SourceConfig = field(default_factory=SourceConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    aws: AwsConfig = field(default_factory=AwsConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    apply: ApplyConfig = field(default_factory=ApplyConfig)
    deletes: DeletesConfig = field(default_factory=DeletesConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    cutover: CutoverConfig = field(default_factory=CutoverConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    leases: LeasesConfig = field(default_factory=LeasesConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    ttl: dict[str, TtlDecision] = field(default_factory=dict)
    """`[ttl]`: namespace -> the decision for its `_ts` expiry (`cosmigrate.ttl`); no environment override."""


_SECTIONS = {f.name: f.type for f in fields(Config) if f.name not in ("cluster_name", "ttl")}
_LEGACY_ENV = {
    "SOURCE_URI": ("source", "uri"),
    "CLUSTER_NAME": (None, "cluster_name"),
}


def _coerce(key: str, value: Any, default: Any, from_env: bool) -> Any:
    """Convert `value` to the type of `default`, or raise a ConfigError naming `key`."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if from_env and str(value).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return str(value).lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_env:
            try:
                return int(str(value))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a whole number, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_env:
            try:
                return float(str(value))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if kind is list:
        if from_env and isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    if isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected a string, got {value!r}")


def _unknown(key: str, name: str, known: Iterable[str]) -> ConfigError:
    """An unknown key, with the likely intended one when a known key is a letter or two away."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    hint = f"did you mean {key.rpartition('.')[0] + '.' if '.' in key else ''}{close[0]}? " if close else ""
    return ConfigError(f"{key}: unknown key ({hint}known: {', '.join(sorted(known))})")


def _apply(section_obj: Any, section: str, values: Mapping[str, Any], from_env: bool) -> None:
    known = {f.name for f in fields(section_obj)}
    for name, value in values.items():
        key = f"{section}.{name}"
        if name not in known:
            raise _unknown(key, name, known)
        setattr(section_obj, name, _coerce(key, value, getattr(section_obj, name), from_env))


PLACEHOLDER = "CHANGE-ME"
"""What the installer's skeleton holds where a manual install must put its own value."""
MUST_SET = ("cluster_name", "source.uri", "target.uri", "target.tls_ca_file", "store.url", "ledger.url", "aws.region")
"""The keys a manual install sets (the installer's skeleton has a placeholder or a reference for each)."""


def _refuse_placeholders(cfg: Config) -> None:
    """A value still holding the skeleton's CHANGE-ME (after the environment's overrides) is refused, naming the
    key, however valid it looks: `check-config` must not pass a skeleton nobody edited."""
    found = [("cluster_name", cfg.cluster_name)] + [
        (f"{section}.{f.name}", getattr(getattr(cfg, section), f.name))
        for section in _SECTIONS for f in fields(getattr(cfg, section))]
    keys = [key for key, value in found if isinstance(value, str) and PLACEHOLDER in value]
    if keys:
        raise ConfigError(f"{', '.join(keys)}: still the installer's {PLACEHOLDER} placeholder; set "
                          f"{'it' if len(keys) == 1 else 'them'} (a manual install sets {', '.join(MUST_SET)})")


DEFAULT_CONFIG_PATH = "/etc/cosmigrate/cosmigrate.toml"
"""Where every command looks for the config when neither --config nor COSMIGRATE_CONFIG names one."""

# COSMIGRATE_* variables that are not config overrides: the process's own knobs, and the test suite's soak sizes
# (a child process inherits them). Any other COSMIGRATE_* variable that looks like a config key is a typo.
PROCESS_ENV = frozenset({
    "COSMIGRATE_CONFIG", "COSMIGRATE_CRASH_POINTS", "COSMIGRATE_JOURNAL_SOCKET", "COSMIGRATE_ROOT",
    "COSMIGRATE_CRASH_KILLS", "COSMIGRATE_APPLY_KILLS", "COSMIGRATE_E2E_CHANGES", "COSMIGRATE_READY_FAULT_POLLS",
})


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p}: not found") from None
    except PermissionError:
        raise ConfigError(f"config file {p}: not readable (permission denied)") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {p}: is a directory") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {p}: not valid TOML ({exc})") from None


def load_config(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None, *,
                secrets: bool = True) -> Config:
    """Read the TOML file (if any), apply environment overrides, validate.

    `secrets=False` leaves `source.uri` / `target.uri` as written (an `env:`, `file:`,
    `credential:` or ARN reference is not resolved, and the URIs are not checked): for
    the commands that never connect to a database (`ledger init`, `batches`), so they
    run under the instance role alone, without the root-only environment file.
    """
    env = os.environ if env is None else env
    raw: dict[str, Any] = _read_toml(path) if path is not None else {}
    cfg = Config()
    for name, value in raw.items():
        if name == "cluster_name":
            cfg.cluster_name = _coerce("cluster_name", value, "", False)
        elif name == "ttl":
            if not isinstance(value, dict):
                raise ConfigError("ttl: expected a [ttl] table of \"db.collection\" = decision")
            cfg.ttl = {ns: parse_ttl_decision(ns, v) for ns, v in value.items()}
        elif name in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: expected a [{name}] table")
            _apply(getattr(cfg, name), name, value, from_env=False)
        else:
            raise _unknown(name, name, ["cluster_name", *_SECTIONS, "ttl"])
    check_env_names(env, _env_references(raw))
    _apply_env(cfg, env)
    _refuse_placeholders(cfg)
    if secrets:
        resolve_secrets(cfg, env)
    _resolve_region(cfg, env)
    validate(cfg, uris=secrets)
    return cfg


def _env_references(raw: Any) -> set[str]:
    """Names that the file reads as `env:NAME` secrets: those variables are meant to be set."""
    if isinstance(raw, dict):
        return set().union(*(_env_references(v) for v in raw.values())) if raw else set()
    if isinstance(raw, str) and raw.startswith("env:"):
        return {raw[4:]}
    return set()


def config_env_names() -> list[str]:
    """Every `COSMIGRATE_<SECTION>_<KEY>` override (and COSMIGRATE_CLUSTER_NAME)."""
    names = ["COSMIGRATE_CLUSTER_NAME"]
    defaults = Config()
    for section in _SECTIONS:
        names.extend(f"COSMIGRATE_{section.upper()}_{f.name.upper()}" for f in fields(getattr(defaults, section)))
    return names


def check_env_names(env: Mapping[str, str], referenced: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """A mistyped override (`COSMIGRATE_CAPTURE_EXLUDE`) must not be ignored silently: it would migrate what
    the operator meant to exclude. A COSMIGRATE_* variable that names a config section, or is one or two
    letters away from an override, and is not a known one, is an error with the likely intended name."""
    import difflib

    known = config_env_names()
    sections = [f"COSMIGRATE_{s.upper()}_" for s in _SECTIONS]
    for var in sorted(env):
        if not var.startswith("COSMIGRATE_") or var in known or var in PROCESS_ENV or var in referenced:
            continue
        close = difflib.get_close_matches(var, known, n=1, cutoff=0.85)
        if close or any(var.startswith(prefix) for prefix in sections):
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"environment variable {var}: not a cosmigrate setting{hint}; the overrides are "
                              "COSMIGRATE_<SECTION>_<KEY>, see the README's configuration")


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Variables from a systemd EnvironmentFile (KEY=VALUE lines, # or ; comments, optional quotes).

    `preflight --env-file /etc/cosmigrate/cosmigrate.env` thus sees the same secrets as the
    unit, without the shell (a connection string's `&` would end a `source`d line).
    """
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"environment file {p}: not found") from None
    except PermissionError:
        raise ConfigError(f"environment file {p}: not readable (permission denied; it is root-only: use sudo)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"environment file {p}: cannot read it ({exc.__class__.__name__})") from None
    out: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"environment file {p} line {number}: expected NAME=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[name] = value
    return out


def control_socket(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> str:
    """The control socket path from the config file alone: `ctl` never resolves secrets or checks the rest
    (an operator's shell cannot read the service's root-only environment file, and needs none of it)."""
    env = os.environ if env is None else env
    socket = ControlConfig().socket
    if path is not None:
        raw = _read_toml(path)
        control = raw.get("control", {})
        if isinstance(control, dict) and "socket" in control:
            if not isinstance(control["socket"], str) or not control["socket"]:
                raise ConfigError("control.socket: expected a path")
            socket = control["socket"]
    return env.get("COSMIGRATE_CONTROL_SOCKET") or socket


def worker_socket(path: str, worker: str) -> str:
    """A worker's own control socket: `control.sock` becomes `control.<worker>.sock` (unchanged without a name)."""
    if not worker:
        return path
    head, _, tail = path.rpartition("/")
    stem, dot, ext = tail.rpartition(".")
    name = f"{stem}.{worker}.{ext}" if dot and stem else f"{tail}.{worker}"
    return f"{head}/{name}" if head or path.startswith("/") else name


def _profile_region() -> str:
    """The region of the AWS profile (~/.aws/config), read the way botocore reads it."""
    import botocore.session
    from botocore.exceptions import BotoCoreError

    try:
        return str(botocore.session.Session().get_config_variable("region") or "")
    except BotoCoreError:
        return ""


def _resolve_region(cfg: Config, env: Mapping[str, str]) -> None:
    """Fill `aws.region` from the environment, and insist on one for a DynamoDB ledger.

    Without a region botocore raises NoRegionError deep inside the first ledger call. It is
    looked up after the secrets on purpose: a Secrets Manager ARN carries its own region.
    """
    if not cfg.aws.region:
        cfg.aws.region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or ""
    if not cfg.aws.region and urlsplit(cfg.ledger.url).scheme == "dynamodb":
        cfg.aws.region = _profile_region()
        if not cfg.aws.region:
            raise ConfigError("aws.region: required for a dynamodb:// ledger (set aws.region, "
                              "or AWS_REGION / AWS_DEFAULT_REGION in the environment)")


SECRET_KEYS = (("source", "uri"), ("target", "uri"))


def resolve_secret(key: str, value: str, env: Mapping[str, str], cfg: Config) -> str:
    """Turn a secret reference into its value.

    `env:NAME` (an environment variable, e.g. from an EnvironmentFile), `file:/path`,
    `credential:NAME` (systemd LoadCredential, under $CREDENTIALS_DIRECTORY) or an AWS
    Secrets Manager ARN (`arn:aws:secretsmanager:...`; a JSON secret may hold the value
    under "uri" or "connection_string"). Anything else is taken literally.
    """
    if value.startswith("env:"):
        name = value[4:]
        if name not in env:
            raise ConfigError(f"{key}: environment variable {name} is not set")
        return env[name]
    if value.startswith(("file:", "credential:")):
        if value.startswith("file:"):
            path = Path(value[5:])
        else:
            directory = env.get("CREDENTIALS_DIRECTORY")
            if not directory:
                raise ConfigError(f"{key}: {value} needs systemd's LoadCredential= ($CREDENTIALS_DIRECTORY is not set)")
            path = Path(directory) / value[len("credential:"):]
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            raise ConfigError(f"{key}: secret file {path} does not exist") from None
        except PermissionError:
            raise ConfigError(f"{key}: secret file {path} is not readable by this user") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{key}: cannot read secret file {path} ({exc.__class__.__name__})") from None
    if value.startswith("arn:aws:secretsmanager:"):
        return _secrets_manager(key, value, cfg)
    return value


def _secrets_manager(key: str, arn: str, cfg: Config) -> str:
    import json

    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    region = cfg.aws.region or arn.split(":")[3]
    kwargs: dict[str, Any] = {"region_name": region}
    if cfg.aws.endpoint_url:
        kwargs["endpoint_url"] = cfg.aws.endpoint_url
    try:
        secret = boto3.client("secretsmanager", **kwargs).get_secret_value(SecretId=arn)["SecretString"]
    except (ClientError, BotoCoreError, KeyError) as exc:
        code = exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else exc.__class__.__name__
        raise ConfigError(f"{key}: cannot read secret {arn} from Secrets Manager ({code})") from None
    try:
        parsed = json.loads(secret)
    except ValueError:
        return str(secret).strip()
    if isinstance(parsed, dict):
        for field_name in ("uri", "connection_string", "connectionString"):
            if field_name in parsed:
                return str(parsed[field_name])
        if key == "target.uri" and all(isinstance(parsed.get(k), str) for k in ("host", "username", "password")):
            return docdb_uri(parsed)
        raise ConfigError(f"{key}: secret {arn} is JSON without a \"uri\" or \"connection_string\" field"
                          + (" (or host, username and password: a DocumentDB credentials secret)"
                             if key == "target.uri" else ""))
    return str(parsed)


def docdb_uri(secret: Mapping[str, Any]) -> str:
    """The target URI from a DocumentDB credentials secret (Secrets Manager's documented shape:
    `username`, `password`, `host`, `port`, `ssl`), e.g. the one documentdb.yaml creates and attaches."""
    from urllib.parse import quote_plus

    port = int(secret.get("port") or 27017)
    tls = "false" if str(secret.get("ssl", "true")).lower() == "false" else "true"
    return (f"mongodb://{quote_plus(str(secret['username']))}:{quote_plus(str(secret['password']))}@"
            f"{secret['host']}:{port}/?tls={tls}&replicaSet=rs0&readPreference=secondaryPreferred&retryWrites=false")


def resolve_secrets(cfg: Config, env: Mapping[str, str]) -> None:
    for section, name in SECRET_KEYS:
        obj = getattr(cfg, section)
        setattr(obj, name, resolve_secret(f"{section}.{name}", getattr(obj, name), env, cfg))


def _apply_env(cfg: Config, env: Mapping[str, str]) -> None:
    for var, (section, name) in _LEGACY_ENV.items():
        if var in env:
            if section is None:
                cfg.cluster_name = env[var]
            else:
                setattr(getattr(cfg, section), name, env[var])
    bucket = env.get("S3_CHANGE_FEED_BUCKET_NAME")
    if bucket:
        cfg.store.url = f"s3://{bucket}/cosmigrate"
    if "COSMIGRATE_CLUSTER_NAME" in env:
        cfg.cluster_name = env["COSMIGRATE_CLUSTER_NAME"]
    for section in _SECTIONS:
        obj = getattr(cfg, section)
        for f in fields(obj):
            var = f"COSMIGRATE_{section.upper()}_{f.name.upper()}"
            if var in env:
                _apply(obj, section, {f.name: env[var]}, from_env=True)


# Bucket and table names: a URL with anything else in that place usually carries credentials.
_AWS_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _check_url(key: str, url: str, schemes: dict[str, tuple[str, str]]) -> None:
    """A URL of one of `schemes`: "remote" ones need a host part (bucket, table), "local" ones an absolute path.

    The URL is never echoed whole: only its scheme and host (it may carry `key:secret@`).
    """
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        choices = " or ".join(f"{s}://..." for s in schemes)
        raise ConfigError(f"{key}: must be {choices} (got {describe_url(url)})")
    kind, hint = schemes[parts.scheme]
    if "@" in parts.netloc or (kind == "remote" and parts.netloc and not _AWS_NAME.fullmatch(parts.netloc)):
        raise ConfigError(f"{key}: must not hold credentials (user:password@); AWS credentials come from the "
                          "instance role or the environment")
    ok = bool(parts.netloc) if kind == "remote" else parts.netloc in ("", "localhost") and parts.path.startswith("/")
    if not ok:
        raise ConfigError(f"{key}: {hint} (got {describe_url(url)})")


# RFC 3986 gen-delims, '+' (read as a space by PyMongo's unquote_plus) and spaces must be percent-encoded.
_MUST_ESCAPE = frozenset("/?#[]@+")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPE_HINT = ("the user name or password holds characters that must be percent-encoded "
                "(encode it with urllib.parse.quote_plus; a Cosmos key's / + = become %2F %2B %3D)")


def _intended_userinfo(rest: str) -> str | None:
    """What the operator meant as user:password: everything before the last '@' (a password may hold
    '/', '?' and '@'), unless that '@' sits in a query value."""
    at = rest.rfind("@")
    if at < 0:
        return None
    before = rest[:at]
    query = before.find("?")
    if query >= 0 and "=" in before[query:]:
        return None
    return before


def _needs_escaping(userinfo: str) -> bool:
    _, _, password = userinfo.partition(":")
    return (any(c in _MUST_ESCAPE or c.isspace() for c in userinfo) or ":" in password
            or _BAD_PERCENT.search(userinfo) is not None)


def _secret_pieces(rest: str) -> list[str]:
    """Pieces of the password (and of session tokens) long enough to recognise in a driver message."""
    userinfo = rest[: rest.rfind("@")] if "@" in rest else ""
    tokens = re.findall(r"(?i)AWS_SESSION_TOKEN(?::|%3A)([^&]*)", rest)
    return [p for text in (userinfo, *tokens) for p in re.split(r"[:/@?#&=,+%\s]+", text) if len(p) >= 3]


def _check_mongo_uri(key: str, uri: str) -> Mapping[str, Any]:
    """Parse a connection string the way the driver will (no DNS) and return its options.

    The driver's own errors are tracebacks at start-up, and some quote the piece of an unescaped
    password that it took for a port or a database name; here they become one line naming the key.
    """
    if uri != uri.strip():
        raise ConfigError(f"{key}: remove the spaces or line breaks around the connection string")
    if not uri.startswith(("mongodb://", "mongodb+srv://")):
        raise ConfigError(f"{key}: must start with mongodb:// or mongodb+srv:// (got {describe_url(uri)})")
    rest = uri.partition("://")[2]
    userinfo = _intended_userinfo(rest)
    if userinfo is not None and _needs_escaping(userinfo):
        raise ConfigError(f"{key}: {_ESCAPE_HINT}")
    try:
        from pymongo.uri_parser_shared import _validate_uri
    except ImportError:  # another PyMongo layout: the client reports what is wrong when it starts
        return {}
    import warnings

    from pymongo.errors import PyMongoError

    def quotes_a_secret(message: str) -> bool:
        return "mechanism propert" in message or any(p in message for p in _secret_pieces(rest))

    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            parsed = _validate_uri(uri, 27017, True, True, True)
    except (PyMongoError, ValueError, TypeError, OSError) as exc:
        lines = str(exc).strip().splitlines()
        message = redact(lines[0] if lines else type(exc).__name__)
        if quotes_a_secret(message):
            message = "not a valid connection string (the driver's explanation would quote a secret)"
        raise ConfigError(f"{key}: {message}") from None
    # Other warnings (an unknown option) the client repeats on stderr when it starts, where nothing redacts
    # them: one that would quote a piece of a secret (a session token cut at a ',') is an error here instead.
    if any(quotes_a_secret(str(w.message)) for w in warned):
        raise ConfigError(f"{key}: not a valid connection string (the driver's explanation would quote a secret; "
                          "check authMechanismProperties and the percent-encoding of the credentials)")
    options: Mapping[str, Any] = parsed.get("options") or {}  # PyMongo's case-insensitive mapping
    return options


def _check_ca_file(key: str, path: str) -> None:
    """The CA bundle must load: the driver opens it while building the client, outside any error handling."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} does not exist (download the bundle from "
                          "https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem)") from None
    except PermissionError:
        raise ConfigError(f"{key}: {path} is not readable by this user") from None
    except (ssl.SSLError, OSError) as exc:
        why = "is a directory" if os.path.isdir(path) else "holds no PEM certificate"
        raise ConfigError(f"{key}: {path} {why} ({exc.__class__.__name__})") from None


# The cluster name is a key component (store, ledger) and part of the lock file's name.
MAX_CLUSTER_NAME_BYTES = 100
# The longest S3 key prefix that leaves room for the batch keys (cosmigrate.stores.base.MAX_PREFIX_BYTES).
MAX_PREFIX_BYTES = 512
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107


def check_files(cfg: Config) -> None:
    """The files the clients open (CA bundles) exist and load.

    Only for the commands that connect (`run`, `preflight`): `ctl` and the
    installer's skeleton check must work on a host where the bundle is not
    downloaded yet. The driver would open the file while building the client,
    outside any error handling, so it is checked here first.
    """
    for key, uri in (("source.uri", cfg.source.uri), ("target.uri", cfg.target.uri)):
        ca = _check_mongo_uri(key, uri).get("tlsCAFile")
        if ca:
            _check_ca_file(f"{key} tlsCAFile", str(ca))
    if cfg.target.tls_ca_file:
        _check_ca_file("target.tls_ca_file", cfg.target.tls_ca_file)


def validate(cfg: Config, uris: bool = True) -> None:
    """Check values (not just types); every message names its key (`uris=False`: leave the URIs unchecked)."""
    if not cfg.cluster_name:
        raise ConfigError("cluster_name: required (a name for this migration, e.g. the Cosmos account name)")
    if not all(c.isalnum() or c in "-_." for c in cfg.cluster_name):
        raise ConfigError("cluster_name: use only letters, digits, '-', '_' and '.'")
    if cfg.cluster_name in (".", ".."):
        # It names a directory of the batch store and the lock file beside the ledger: "." and ".." would
        # name the store's own directory or its parent.
        raise ConfigError(f"cluster_name: {cfg.cluster_name!r} is not a name; use letters or digits too")
    if len(cfg.cluster_name.encode()) > MAX_CLUSTER_NAME_BYTES:
        raise ConfigError(f"cluster_name: at most {MAX_CLUSTER_NAME_BYTES} bytes long")
    options: dict[str, Mapping[str, Any]] = {}
    for key, uri in (("source.uri", cfg.source.uri), ("target.uri", cfg.target.uri)):
        if not uri:
            raise ConfigError(f"{key}: required (a mongodb:// connection string)")
        options[key] = _check_mongo_uri(key, uri) if uris else {}
    if cfg.target.tls_ca_file and uris:
        if options["target.uri"].get("tls") is False:
            raise ConfigError("target.tls_ca_file: set, but target.uri turns TLS off (tls=false); remove one of them")
    tls = connection_tls(cfg.target.uri, cfg.target.tls_ca_file) if uris else None
    if tls is not None and not tls.secure and not cfg.target.allow_insecure_tls:
        # The target connection carries the DocumentDB password and every document: never in clear, never to
        # whoever answers. The message names options only, never a piece of the connection string.
        raise ConfigError(f"target.uri: {tls.problem}; DocumentDB must be reached over TLS with its certificate "
                          "verified (tls=true, and target.tls_ca_file = the DocumentDB CA bundle); "
                          "set target.allow_insecure_tls = true only for a test set-up")
    _check_url("store.url", cfg.store.url, {
        "s3": ("remote", "s3 URL needs a bucket, e.g. s3://my-bucket/prefix"),
        "file": ("local", "file URL needs an absolute path, e.g. file:///var/lib/cosmigrate/batches"),
    })
    if len(urlsplit(cfg.store.url).path.strip("/").encode()) > MAX_PREFIX_BYTES and cfg.store.url.startswith("s3:"):
        raise ConfigError(f"store.url: the key prefix may be at most {MAX_PREFIX_BYTES} bytes long (S3 keys end at 1024)")
    if cfg.store.retention_hours < 0:
        raise ConfigError("store.retention_hours: must be 0 or more")
    if cfg.store.sse not in ("AES256", "aws:kms", "none"):
        raise ConfigError(f"store.sse: must be AES256, aws:kms or none (got {cfg.store.sse!r})")
    _check_url("ledger.url", cfg.ledger.url, {
        "dynamodb": ("remote", "dynamodb URL needs a table, e.g. dynamodb://cosmigrate-ledger"),
        "sqlite": ("local", "sqlite URL needs an absolute path, e.g. sqlite:///var/lib/cosmigrate/ledger.db"),
    })
    if cfg.capture.start_at not in ("now", "beginning"):
        raise ConfigError(f"capture.start_at: must be \"now\" or \"beginning\" (got {cfg.capture.start_at!r})")
    for key in ("max_batch_events", "max_batch_bytes", "max_unflushed_bytes", "max_unflushed_bytes_total",
                "max_await_ms"):
        if getattr(cfg.capture, key) < 1:
            raise ConfigError(f"capture.{key}: must be at least 1")
    if cfg.capture.max_batch_events > 100_000:
        raise ConfigError("capture.max_batch_events: at most 100000 (DocumentDB's write batch limit)")
    if cfg.capture.max_unflushed_bytes < cfg.capture.max_batch_bytes:
        raise ConfigError("capture.max_unflushed_bytes: must be at least capture.max_batch_bytes")
    if cfg.capture.max_unflushed_bytes_total < cfg.capture.max_unflushed_bytes:
        raise ConfigError("capture.max_unflushed_bytes_total: must be at least capture.max_unflushed_bytes")
    for key in ("pool_size", "max_batches_per_round", "collapse_max_bytes", "max_ops_per_write", "max_bytes_per_write",
                "write_concurrency"):
        if getattr(cfg.apply, key) < 1:
            raise ConfigError(f"apply.{key}: must be at least 1")
    if cfg.apply.max_ops_per_write > 100_000:
        raise ConfigError("apply.max_ops_per_write: at most 100000 (DocumentDB's write batch limit)")
    for key in ("poll_interval_s", "cutover_threshold_seconds"):
        if getattr(cfg.apply, key) <= 0:
            raise ConfigError(f"apply.{key}: must be greater than 0")
    if len(os.fsencode(cfg.control.socket)) > _MAX_SOCKET_PATH:
        raise ConfigError(f"control.socket: at most {_MAX_SOCKET_PATH} bytes long (a Unix socket path limit); "
                          "choose a shorter path")
    if cfg.control.max_request_bytes < 256:
        raise ConfigError("control.max_request_bytes: must be at least 256")
    for key in ("drain_timeout_s", "status_interval_s"):
        if getattr(cfg.daemon, key) <= 0:
            raise ConfigError(f"daemon.{key}: must be greater than 0")
    if cfg.daemon.lock_file and not cfg.daemon.lock_file.startswith("/"):
        raise ConfigError(f"daemon.lock_file: must be an absolute path (got {cfg.daemon.lock_file!r})")
    if cfg.daemon.worker and not all(c.isalnum() or c in "-_" for c in cfg.daemon.worker):
        raise ConfigError("daemon.worker: use only letters, digits, '-' and '_'")
    for key in ("lease_s", "renew_s", "balance_s"):
        if getattr(cfg.leases, key) <= 0:
            raise ConfigError(f"leases.{key}: must be greater than 0")
    if cfg.leases.renew_s * 2 > cfg.leases.lease_s:
        raise ConfigError(f"leases.renew_s: at most half of leases.lease_s ({cfg.leases.lease_s:g}), so that one "
                          "lost renew does not lose the lease")
    if not 0 < cfg.apply.write_bound_s < cfg.leases.lease_s:
        raise ConfigError(f"apply.write_bound_s: must be greater than 0 and under leases.lease_s "
                          f"({cfg.leases.lease_s:g}): a new owner waits the old lease plus this bound")
    for key in ("max_batch_age_s", "discovery_interval_s", "head_sample_interval_s"):
        if getattr(cfg.capture, key) <= 0:
            raise ConfigError(f"capture.{key}: must be greater than 0")
    if cfg.capture.head_sample_max_per_s <= 0:
        raise ConfigError("capture.head_sample_max_per_s: must be greater than 0")
    if not 0 <= cfg.capture.idle_poll_max_s <= 60:
        raise ConfigError("capture.idle_poll_max_s: must be between 0 and 60 (0: an idle stream is polled "
                          "without pause)")
    if not 1 <= cfg.capture.head_sample_concurrency <= 256:
        raise ConfigError("capture.head_sample_concurrency: must be between 1 and 256 (head samples in flight at "
                          "once, on a pool of 100 connections)")
    if not 0 <= cfg.capture.min_batch_age_s <= cfg.capture.max_batch_age_s:
        raise ConfigError("capture.min_batch_age_s: must be between 0 and capture.max_batch_age_s")
    for section in ("deletes", "verify"):
        obj = getattr(cfg, section)
        if not 0 < obj.max_source_share <= 1:
            raise ConfigError(f"{section}.max_source_share: must be more than 0 and at most 1")
        if not 1 <= obj.page_size <= 100_000:
            raise ConfigError(f"{section}.page_size: must be between 1 and 100000")
        if obj.interval_s <= 0:
            raise ConfigError(f"{section}.interval_s: must be greater than 0")
    if cfg.verify.max_mismatches < 0:
        raise ConfigError("verify.max_mismatches: must be 0 or more")
    for key in ("quiesce_s", "precheck_timeout_s"):
        if getattr(cfg.cutover, key) <= 0:
            raise ConfigError(f"cutover.{key}: must be greater than 0")
    if cfg.cutover.recheck_rounds < 1:
        raise ConfigError("cutover.recheck_rounds: must be at least 1")
    if cfg.log.level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log.level: must be debug, info, warning or error (got {cfg.log.level!r})")
    if cfg.log.format not in ("auto", "json", "console"):
        raise ConfigError(f"log.format: must be auto, json or console (got {cfg.log.format!r})")
    if cfg.log.progress_interval_s <= 0:
        raise ConfigError("log.progress_interval_s: must be greater than 0")
    if cfg.metrics.listen:
        listen_address(cfg.metrics.listen)
    if cfg.metrics.cloudwatch_interval_s <= 0:
        raise ConfigError("metrics.cloudwatch_interval_s: must be greater than 0")
    if not re.fullmatch(r"[A-Za-z0-9._/#:-]{1,255}", cfg.metrics.cloudwatch_namespace) or \
            cfg.metrics.cloudwatch_namespace.startswith("AWS/"):
        raise ConfigError("metrics.cloudwatch_namespace: 1-255 letters, digits or . _ / # : -, not starting with AWS/")


def listen_address(value: str) -> tuple[str, int]:
    """`metrics.listen` as (host, port): "127.0.0.1:9464", "[::1]:9464" or "localhost:9464" (port 0: any free one)."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536 or not re.fullmatch(r"[A-Za-z0-9.:-]+", host):
        raise ConfigError(f"metrics.listen: expected host:port, e.g. \"127.0.0.1:9464\" (got {value!r})")
    return host, int(port)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def to_toml(cfg: Config) -> str:
    """Render a config as TOML (the demo and tests write configs for child processes)."""
    lines = [f"cluster_name = {_toml_value(cfg.cluster_name)}"]
    for section in _SECTIONS:
        lines.append(f"\n[{section}]")
        obj = getattr(cfg, section)
        for f in fields(obj):
            lines.append(f"{f.name} = {_toml_value(getattr(obj, f.name))}")
    if cfg.ttl:
        lines.append("\n[ttl]")
        lines.extend(f"{_toml_value(ns)} = {_toml_value(d.text())}" for ns, d in cfg.ttl.items())
    return "\n".join(lines) + "\n"
