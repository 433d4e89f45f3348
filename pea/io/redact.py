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

And whatever the form: the values this process holds as secrets (KNOWN_SECRETS: every environment variable whose
name says secret, and the password and secret query parameters of every URL in the environment, e.g.
MLFLOW_TRACKING_URI's), wherever they appear, also percent-encoded or inside a library's repr of a request: a
password with a '/' or '#' that no URL parser finds, a token echoed in a header, are masked all the same.

    with masked_errors(): ...        # an exception leaves with its message, its notes and its whole chain masked
    mask_logging()                   # every record any handler writes (Prefect's, MLflow's), tracebacks included
    sys.stdout = MaskedStream(sys.stdout)  # what a command prints
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

MASK = "***"
SECRET_WORDS = r"token|secret|passw(?:or)?d|credential|signature|api_?key|access_?key|private_?key|auth"
SECRET_PARAM = re.compile(rf"^(?:sig|key|code|[\w.-]*(?:{SECRET_WORDS})[\w.-]*)$", re.IGNORECASE)
SECRET_ENV = r"(?:[A-Za-z_][A-Za-z0-9_]*)?(?:TOKEN|PASSWORD|PASSWD|SECRET|KEY|CREDENTIAL|AUTH)[A-Za-z0-9_]*"
URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
# NAME=value: a value runs to whitespace, ';', ',', '&' or a quote (quoted values entirely).
ENV_ASSIGN = re.compile(rf"(?<![\w-])({SECRET_ENV})=(\"[^\"]*\"|'[^']*'|[^\s;,&'\"]+)", re.IGNORECASE)
GENV_PAIR = re.compile(rf"(-genv\s+)({SECRET_ENV})(\s+)(\"[^\"]*\"|'[^']*'|\S+)", re.IGNORECASE)
SECRET_ENV_NAME = re.compile(rf"^{SECRET_ENV}$", re.IGNORECASE)
MIN_SECRET = 6  # shorter values ("1", "false" of TOKENIZERS_PARALLELISM) would mask ordinary words


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


def _url_secrets(value: str) -> Iterator[str]:
    """The password and the secret query values of every URL in `value`."""
    for match in URL.finditer(value):
        try:
            parts = urlsplit(match.group(0))
            # The userinfo as written: everything between '://' and the last '@' before the path (a password may
            # hold '/', '#' or '?', which urlsplit would take for the path's start).
            rest = match.group(0).split("://", 1)[1]
            if "@" in rest:
                userinfo = rest.rsplit("@", 1)[0]
                yield userinfo.partition(":")[2] if ":" in userinfo else userinfo
            yield from (v for k, v in parse_qsl(parts.query) if SECRET_PARAM.match(k))
        except ValueError:
            continue


def known_secrets() -> list[str]:
    """The secret values of this process's environment, longest first, each also as it is percent-encoded."""
    found = set()
    for name, value in os.environ.items():
        if SECRET_ENV_NAME.match(name):
            found.add(value)
        if "://" in value:
            found.update(_url_secrets(value))
    found = {form for value in found for form in (value, unquote(value), quote(value, safe=""))}
    return sorted((v for v in found if len(v) >= MIN_SECRET), key=len, reverse=True)


def redact(text: Any) -> Any:
    """`text` with every URL's credentials, every secret assignment and every known secret masked (non-strings
    unchanged)."""
    if not isinstance(text, str):
        return text
    text = URL.sub(lambda m: redact_url(m.group(0)), text)
    text = GENV_PAIR.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3)}{MASK}", text)
    text = ENV_ASSIGN.sub(lambda m: f"{m.group(1)}={MASK}", text)
    for secret in known_secrets():
        text = text.replace(secret, MASK)
    return text


def _mask_exception(err: BaseException, seen: set[int]) -> None:
    if err is None or id(err) in seen:
        return
    seen.add(id(err))
    try:
        err.args = tuple(redact(a) for a in err.args)
    except (AttributeError, TypeError):  # an exception type whose args cannot be set
        pass
    for name in ("message", "msg", "strerror", "filename", "reason"):
        if isinstance(getattr(err, name, None), str):
            try:
                setattr(err, name, redact(getattr(err, name)))
            except (AttributeError, TypeError):
                pass
    if getattr(err, "__notes__", None):
        err.__notes__ = [redact(n) for n in err.__notes__]
    _mask_exception(err.__cause__, seen)
    _mask_exception(err.__context__, seen)


def mask_exception(err: BaseException) -> BaseException:
    """`err` with the credentials in its message, notes and every exception of its chain masked, in place (a
    traceback prints the chain: MLflow's client quotes the whole request URL, password included)."""
    _mask_exception(err, set())
    return err


@contextmanager
def masked_errors() -> Iterator[None]:
    """Re-raise any exception with the credentials in it masked (same type, same traceback; mask_exception). Also a
    decorator (`@masked_errors()`)."""
    try:
        yield
    except Exception as err:
        mask_exception(err)
        raise


def one_line(err: BaseException) -> str:
    """An error as one masked line, `Type: message` (a message of several lines joined), for a command to print."""
    text = " ".join(str(err).split()) or repr(err)
    return redact(f"{type(err).__name__}: {text}")


class MaskedStream(io.TextIOBase):
    """A text stream writing each line to `stream` masked (a line ends at '\n' or '\r', progress bars' ending; what
    is left is written at flush). For sys.stdout and sys.stderr while a command runs: print, warnings and log
    handlers made meanwhile all write through it."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self._stream, self._pending = stream, ""

    def write(self, text: str) -> int:
        *lines, self._pending = re.split(r"(?<=[\n\r])", self._pending + text)
        for line in lines:
            self._stream.write(redact(line))
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._stream.write(redact(self._pending))
            self._pending = ""
        self._stream.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self._stream, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:  # the rest (buffer, reconfigure, ...) as the wrapped stream has it
        if name == "_stream":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self._stream, name)


class MaskingFilter(logging.Filter):
    """Masks a record's message and its traceback before any handler formats it (Prefect's console and API
    handlers, a file handler): the message is rendered and masked, the traceback formatted and masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: log it as it is, masked
            message = str(record.msg)
        record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info[1] is not None:
            mask_exception(record.exc_info[1])
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def mask_logging() -> None:
    """Put MaskingFilter on every handler of every logger there is now (root, Prefect's console and API handlers,
    MLflow's), once each."""
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, MaskingFilter) for f in handler.filters):
                handler.addFilter(MaskingFilter())


def redact_all(data: Any) -> Any:
    """`redact` over every string of a JSON-like structure (dicts, lists, tuples), keys untouched."""
    if isinstance(data, dict):
        return {k: redact_all(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(redact_all(v) for v in data)
    return redact(data)
