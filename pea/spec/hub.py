"""Where a model's files come from: a Hub revision pinned to the commit it names, and safetensors only.

A branch such as `main` moves when upstream pushes; caches, store keys and lineage tags must name the
weights actually used, so every load and every key goes through `pinned_revision` first. Offline, the
local Hugging Face cache answers (its `refs/<revision>` file names the commit); online, the Hub does.
Local directories have no revision: their content digest identifies them (pea.models.model_key).

An unreachable Hub (DNS failure, refused or reset connection, timeout, a proxy's error: air-gapped clusters) is
offline: the first call that finds it so puts this process's Hugging Face clients offline (huggingface_hub's
HF_HUB_OFFLINE, which transformers and diffusers ask before every request), so the loads that follow read the
cache at once instead of each waiting on the network, and a model the cache lacks gets the offline message that
names the download command, never a connection traceback.
"""

from __future__ import annotations

import logging
import re
import socket
from contextlib import contextmanager
from pathlib import Path

COMMIT = re.compile(r"^[0-9a-f]{40}$")
log = logging.getLogger(__name__)


def unreachable(err: BaseException) -> bool:
    """True when `err` (or an error it wraps) says the Hub could not be talked to, rather than what it answered: a
    transport failure (a socket's, or httpx's: huggingface_hub 2 ships its own fork, httpx2, so the class is
    recognised by name), offline mode, or a 5xx/407 a server or proxy answered for it."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (OfflineModeIsEnabled, ConnectionError, TimeoutError, socket.gaierror)) or any(
                c.__name__ == "TransportError" and c.__module__.startswith("httpx") for c in type(err).__mro__):
            return True
        response = getattr(err, "response", None)
        if isinstance(err, HfHubHTTPError) and response is not None and (response.status_code >= 500
                                                                            or response.status_code == 407):
            return True
        err = err.__cause__ or err.__context__
    return False


def go_offline(err: BaseException) -> None:
    """Treat the Hub as offline for the rest of this process (see the module's doc)."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        log.warning("the Hugging Face Hub (%s) cannot be reached (%s): working offline from the cache (%s) for the rest "
                    "of this process", constants.ENDPOINT, type(err).__name__, constants.HF_HUB_CACHE)
        constants.HF_HUB_OFFLINE = True


def is_local(model_id: str) -> bool:
    return Path(model_id).is_dir()


def pinned_revision(model_id: str, revision: str | None) -> str | None:
    """The 40-hex commit `revision` names for a Hub id (None means main); None for a local directory."""
    if is_local(model_id):
        return None
    revision = revision or "main"
    if COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if not constants.HF_HUB_OFFLINE:
        try:
            # A timeout: huggingface_hub's client has none, so a Hub whose packets are dropped would hang here.
            return HfApi(endpoint=constants.ENDPOINT).model_info(model_id, revision=revision,
                                                                 timeout=constants.HF_HUB_ETAG_TIMEOUT).sha
        except Exception as err:  # noqa: BLE001 - any error a Hub request raises: judged below
            if unreachable(err):
                go_offline(err)
            elif not isinstance(err, (HfHubHTTPError, OSError)):  # not an answer about the repo (a bug): say so
                raise
            # the Hub said no (a private or missing repo) or cannot be asked: what the cache knows decides
    try:
        return Path(snapshot_download(model_id, revision=revision, local_files_only=True)).name
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise ValueError(
            f"{model_id} at revision {revision!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"the Hub cannot be asked (offline or unreachable): download it once online with "
            f"`hf download {model_id} --revision {revision}`, or set HF_HUB_CACHE to a cache that has it, or pin "
            "`revision:` in the spec to the 40-hex commit of a snapshot you have") from None


@contextmanager
def safetensors_only(what: str, model_id: str, variant: str | None = None):
    """Turn a load that found no .safetensors file into an error naming the model and the fix (the loaders
    are called with use_safetensors=True, so pickled .bin/.ckpt weights are never read)."""
    try:
        yield
    except Exception as err:
        if unreachable(err):  # a file the pinned snapshot lacks, asked of an unreachable Hub: offline, say so
            go_offline(err)
            raise ValueError(f"{what} {model_id}: a file it needs is not in the Hugging Face cache and the Hub cannot "
                             f"be reached ({type(err).__name__}); download it once online with `hf download "
                             f"{model_id}`, or set HF_HUB_CACHE to a cache that has it") from None
        if not isinstance(err, OSError) or ".safetensors" not in str(err):
            raise
        files = f"{variant}.safetensors" if variant else ".safetensors"
        raise ValueError(
            f"{what} {model_id} has no {files} weights (found: {err}); PEA never loads pickled .bin/.ckpt weights. "
            "Convert them once (load in a trusted environment and save_pretrained with safetensors), pick a "
            "revision that ships safetensors" + (", or set the spec's variant to one that exists" if variant
                                                  else "")) from None
