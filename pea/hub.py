"""Where a model's files come from: a Hub revision pinned to the commit it names, and safetensors only.

A branch such as `main` moves when upstream pushes; caches, store keys and lineage tags must name the
weights actually used, so every load and every key goes through `pinned_revision` first. Offline, the
local Hugging Face cache answers (its `refs/<revision>` file names the commit); online, the Hub does.
Local directories have no revision: their content digest identifies them (pea.models.model_key).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

COMMIT = re.compile(r"^[0-9a-f]{40}$")


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
            return HfApi().model_info(model_id, revision=revision).sha
        except (HfHubHTTPError, OSError):  # unreachable Hub: fall back to what the cache knows
            pass
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
    except OSError as err:
        if ".safetensors" not in str(err):
            raise
        files = f"{variant}.safetensors" if variant else ".safetensors"
        raise ValueError(
            f"{what} {model_id} has no {files} weights (found: {err}); PEA never loads pickled .bin/.ckpt weights. "
            "Convert them once (load in a trusted environment and save_pretrained with safetensors), pick a "
            "revision that ships safetensors" + (", or set the spec's variant to one that exists" if variant
                                                  else "")) from None
