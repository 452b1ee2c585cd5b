"""Secrets kept out of everything shown or written: MLflow params and tags, logs, written configs.

* `mask_uri` / `mask_uris`: credentials in URIs become `user:***@host` (and `?password=***`).
* `secret_values`: the secret values of the environment (a variable named like a token, password,
  secret or API key, e.g. HF_TOKEN, MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY, and the
  password of any URI in it, e.g. FUSION_TRACKING_URI), plus those of the URIs remembered below.
* `redact`: a text with both masked; `RedactingFilter` does it to log records.
* `remember_uri` / `resolve_uri`: a written config holds the masked URI; the real one is used
  only to connect, recovered from the config this process or its parent loaded (`remember_uri`), from
  $FUSION_TRACKING_URI when it is the same URI, or written as `${VARIABLE}` references that are
  expanded from the environment when it is used.

Pure standard library: no Prefect, MLflow or SQLAlchemy.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Iterable, Mapping

from fusion_core.errors import FusionError

MASK = "***"
SERVER_URI_VARIABLE = "FUSION_TRACKING_URI"

# scheme://user:password@  (the password may hold anything but '@' and white space, as SQLAlchemy
# accepts it); a user without a password is no secret and is kept.
_URI_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s:/@?#]*):(?P<password>[^\s@]*)@")
# ?password=...&token=...  (SQLAlchemy and others take credentials as query parameters too)
_QUERY_SECRET = re.compile(r"(?P<key>[?&;](?:[A-Za-z_]*_)?(?:password|passwd|pwd|token|secret|api_?key|access_?key)=)"
                           r"(?P<value>[^&;#\s]+)", re.IGNORECASE)
_ENV_REFERENCE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)\}")
# Parts of an environment variable's name that say its value is a secret.
_SECRET_NAME_PARTS = ("TOKEN", "PASSWORD", "PASSWD", "SECRET", "CREDENTIAL", "CREDENTIALS", "APIKEY")
_SECRET_KEY_QUALIFIERS = ("API", "ACCESS", "PRIVATE", "SECRET", "AUTH", "SIGNING", "ENCRYPTION")
_NOT_SECRETS = {"", "true", "false", "yes", "no", "none", "null", "0", "1"}
_MIN_SECRET_LENGTH = 6  # shorter values (and numbers under 8 digits) would mask ordinary words and counts

_remembered: dict[str, str] = {}  # masked URI -> real URI, of configs this process loaded
# The same for child processes (Prefect's `serve` runs each flow in a subprocess); they inherit the
# environment, which holds the real URI anyway (mlflow.set_tracking_uri sets MLFLOW_TRACKING_URI).
INHERITED_VARIABLE = "FUSION_REMEMBERED_URIS"


def _is_reference(text: str) -> bool:
    return bool(_ENV_REFERENCE.fullmatch(text))


def mask_uri(uri: str) -> str:
    """`uri` with the password of its credentials, and any secret query parameter, replaced by
    ***: postgresql://user:pw@host/db -> postgresql://user:***@host/db. A `${VARIABLE}`
    reference in a password's place is kept (it is no secret). Text without credentials is
    returned unchanged."""
    return mask_uris(uri)


def mask_uris(text: str) -> str:
    """Every URI credential in a free text masked as by `mask_uri`."""
    if not isinstance(text, str) or ("://" not in text and "=" not in text):
        return text

    def password(m: re.Match) -> str:
        if _is_reference(m["password"]) or m["password"] == MASK:
            return m[0]
        return f"{m['scheme']}{m['user']}:{MASK}@"

    def query(m: re.Match) -> str:
        return m[0] if _is_reference(m["value"]) else f"{m['key']}{MASK}"

    text = _URI_CREDENTIALS.sub(password, text)
    return _QUERY_SECRET.sub(query, text) if "://" in text else text


def uri_secrets(text: str) -> list[str]:
    """The passwords and secret query values of the URIs in `text`."""
    if not isinstance(text, str) or "://" not in text:
        return []
    found = [m["password"] for m in _URI_CREDENTIALS.finditer(text)]
    found += [m["value"] for m in _QUERY_SECRET.finditer(text)]
    return [s for s in found if s != MASK and not _is_reference(s)]


def is_secret_name(name: str) -> bool:
    """Whether an environment variable of this name holds a secret: HF_TOKEN, PGPASSWORD,
    MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY, OPENAI_API_KEY (not TOKENIZERS_PARALLELISM)."""
    parts = re.split(r"[^A-Za-z0-9]+", name.upper())
    if any(p.endswith(s) for p in parts for s in _SECRET_NAME_PARTS):
        return True
    return any(p in ("KEY", "KEYS") for p in parts) and any(q in parts for q in _SECRET_KEY_QUALIFIERS)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values that must never be shown: those of secret-named environment variables, the passwords
    of URIs anywhere in the environment, and those of the URIs remembered from loaded configs.
    Longest first (so that a secret containing another is masked whole)."""
    environ = os.environ if environ is None else environ
    found: set[str] = set()
    for name, value in environ.items():
        if is_secret_name(name):
            found.add(value)
        found.update(uri_secrets(value))
    for real in _all_remembered().values():
        found.update(uri_secrets(real))
    found = {v for v in found if len(v) >= _MIN_SECRET_LENGTH and v.strip().lower() not in _NOT_SECRETS
             and not (v.isdigit() and len(v) < 8)}
    return sorted(found, key=len, reverse=True)


def redact(text: Any, secrets: Iterable[str] | None = None) -> Any:
    """A string with its URI credentials and every secret value masked; anything else unchanged."""
    if not isinstance(text, str):
        return text
    text = mask_uris(text)
    for secret in secret_values() if secrets is None else secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact_mapping(data: Mapping[str, Any]) -> dict[str, Any]:
    """{key: redact(value)} (MLflow params and tags)."""
    secrets = secret_values()
    return {k: redact(v, secrets) for k, v in data.items()}


def masked_config_data(data: Any) -> Any:
    """A config's JSON data (model_dump(mode="json")) with the credentials of every URI masked:
    what a written or logged config holds. Values are otherwise kept (paths must stay runnable)."""
    if isinstance(data, dict):
        return {k: masked_config_data(v) for k, v in data.items()}
    if isinstance(data, list):
        return [masked_config_data(v) for v in data]
    return mask_uris(data) if isinstance(data, str) else data


# ------------------------------------------------------------------ the real URI, to connect

def remember_uri(uri: str | None) -> None:
    """Keep the real `uri` of a loaded config in this process, so that a config written with its
    password masked (the resolved config of `fusion run --set`, a study's runs) connects with it."""
    if uri and mask_uris(uri) != uri and not uri_is_masked(uri):
        _remembered[mask_uris(uri)] = uri
        os.environ[INHERITED_VARIABLE] = json.dumps(_remembered)


def forget_uris() -> None:
    """Forget the remembered URIs (tests: a fresh process)."""
    _remembered.clear()
    os.environ.pop(INHERITED_VARIABLE, None)


def _all_remembered() -> dict[str, str]:
    """The URIs remembered here, and those a parent process remembered."""
    try:
        inherited = json.loads(os.environ.get(INHERITED_VARIABLE) or "{}")
    except ValueError:
        inherited = {}
    if not isinstance(inherited, dict):
        inherited = {}
    return {**{k: v for k, v in inherited.items() if isinstance(v, str)}, **_remembered}


def uri_is_masked(uri: str) -> bool:
    return any(m["password"] == MASK for m in _URI_CREDENTIALS.finditer(uri)) or any(
        m["value"] == MASK for m in _QUERY_SECRET.finditer(uri))


def expand_references(uri: str, *, field: str = "tracking.tracking_uri") -> str:
    """`${VARIABLE}` references in `uri` replaced by the environment's values; FusionError naming
    the variable when one is not set."""
    def value(m: re.Match) -> str:
        name = m["name"]
        if name not in os.environ:
            raise FusionError(f"{field} names ${{{name}}}, which is not set in the environment: "
                              f"export {name}=... (the secret stays out of the config and of MLflow)")
        return os.environ[name]

    return _ENV_REFERENCE.sub(value, uri)


def resolve_uri(uri: str, *, field: str = "tracking.tracking_uri") -> str:
    """The URI to connect with, for the `uri` a config holds: `${VARIABLE}` references expanded;
    a masked password (user:***@host: a config fusion wrote, which never holds the secret) taken
    from the config this process loaded with the same URI, else from $FUSION_TRACKING_URI when it
    is the same URI. FusionError when neither has it."""
    if uri_is_masked(uri):
        real = _all_remembered().get(uri)
        env = os.environ.get(SERVER_URI_VARIABLE, "")
        if real is None and env and not uri_is_masked(env) and mask_uris(env) == uri:
            real = env
        if real is None:
            raise FusionError(
                f"{field} {uri} has its password masked (a config written by fusion never holds it): set "
                f"{SERVER_URI_VARIABLE} to the full URI, or give the original config (`fusion rerun RUN_ID "
                f"CONFIG`, `fusion serve CONFIG`), or write the password as ${{VARIABLE}} in the config and "
                f"export VARIABLE")
        return real
    return expand_references(uri, field=field)


# ------------------------------------------------------------------ logs

class RedactingFilter(logging.Filter):
    """Masks URI credentials and the environment's secret values in a log record's message."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's business, not ours
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


_FILTER = RedactingFilter()
# Loggers whose own records are filtered (a logger's filter sees only records logged on it) ...
LOGGERS = ("llm_fusion", "prefect.flow_runs", "prefect.task_runs")
# ... and loggers whose handlers filter every record that reaches them (children's too).
HANDLER_LOGGERS = ("", "prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.extra")


def install_log_redaction() -> None:
    """Add the redacting filter to the pipeline's loggers (Prefect's flow and task run loggers, this
    project's) and to the handlers of the root and Prefect loggers (so also to records of
    libraries that propagate there); idempotent. Call once logging is configured (in the flow)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for name in HANDLER_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
