"""Mask credentials and tokens in text that is printed, logged, shown as an artifact or recorded in MLflow.

    redact("sqlite:///x.db")                                   -> unchanged
    redact("https://alice:s3cret@mlflow.example.org")          -> "https://alice:***@mlflow.example.org"
    redact("https://b.s3.amazonaws.com/zh.parquet?X-Amz-Signature=ab12&v=2") -> "...?X-Amz-Signature=***&v=2"
    redact("export MLFLOW_TRACKING_TOKEN=abc; cd /run")       -> "export MLFLOW_TRACKING_TOKEN=***; cd /run"

What is masked: the password of a URL's userinfo (a userinfo without one, `https://<token>@host`, entirely);
query parameters whose name says secret (signatures, tokens, keys, credentials, passwords: SECRET_PARAM);
environment assignments whose name says secret (SECRET_ENV: *TOKEN*, *PASSWORD*, *SECRET*, *KEY*, *CREDENTIAL*,
*AUTH*) in the forms DeepSpeed's runners print them: `NAME=value` (pdsh's `export`, openmpi's `-x`, slurm's
`--export=...,NAME=value`, mvapich's `-genv NAME=value`) and `-genv NAME value` (mpich, impi). Masking keeps the
name, so a reader still sees which setting was there. It errs on the side of masking.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
SECRET_WORDS = r"token|secret|passw(?:or)?d|credential|signature|api_?key|access_?key|private_?key|auth"
SECRET_PARAM = re.compile(rf"^(?:sig|key|code|[\w.-]*(?:{SECRET_WORDS})[\w.-]*)$", re.IGNORECASE)
SECRET_ENV = r"(?:[A-Za-z_][A-Za-z0-9_]*)?(?:TOKEN|PASSWORD|PASSWD|SECRET|KEY|CREDENTIAL|AUTH)[A-Za-z0-9_]*"
URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
# NAME=value: a value runs to whitespace, ';', ',', '&' or a quote (quoted values entirely).
ENV_ASSIGN = re.compile(rf"(?<![\w-])({SECRET_ENV})=(\"[^\"]*\"|'[^']*'|[^\s;,&'\"]+)", re.IGNORECASE)
GENV_PAIR = re.compile(rf"(-genv\s+)({SECRET_ENV})(\s+)(\"[^\"]*\"|'[^']*'|\S+)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """`url` with its userinfo password and secret query parameters masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if has_password else f"{MASK}@{host}"
    query = "&".join(_param(p) for p in parts.query.split("&")) if parts.query else parts.query
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _param(pair: str) -> str:
    name, eq, value = pair.partition("=")
    return f"{name}={MASK}" if eq and value and SECRET_PARAM.match(name) else pair


def redact(text: Any) -> Any:
    """`text` with every URL's credentials and every secret assignment masked (non-strings unchanged)."""
    if not isinstance(text, str):
        return text
    text = URL.sub(lambda m: redact_url(m.group(0)), text)
    text = GENV_PAIR.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3)}{MASK}", text)
    return ENV_ASSIGN.sub(lambda m: f"{m.group(1)}={MASK}", text)


@contextmanager
def masked_errors() -> Iterator[None]:
    """Re-raise any exception with the credentials in its message masked (same type, same traceback): MLflow's
    client quotes the whole request URL, password included, when a tracking server cannot be reached. Also a
    decorator (`@masked_errors()`)."""
    try:
        yield
    except Exception as err:
        err.args = tuple(redact(a) for a in err.args)
        if isinstance(getattr(err, "message", None), str):
            err.message = redact(err.message)
        raise


def redact_all(data: Any) -> Any:
    """`redact` over every string of a JSON-like structure (dicts, lists, tuples), keys untouched."""
    if isinstance(data, dict):
        return {k: redact_all(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(redact_all(v) for v in data)
    return redact(data)
