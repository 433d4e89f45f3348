"""The `pea-scan` flow (deployment `scan-languages`): start `pea/train-language` for every language that is due.

A language is due when `data/languages/<lang>.yaml` exists but no model version was trained from it
yet, or when its spec, manifests or filtered data changed since its latest version (see pea.ops).
Dropping a new spec into data/languages/ is all it takes to add a language. A language that already
has a train-language run scheduled, pending or running is not started again. A spec starts nothing until it
validates and names only allowed model sources and paths (pea.spec.discovery): a refused one is listed in the
`language-scan` artifact with its file and fields, the others are handled, then the scan fails so it is noticed.

    python -m flows.scan_flow --profile embedded              # in-process, against $PREFECT_API_URL
    prefect deployment run pea-scan/scan-languages             # the deployment from prefect.yaml
"""

from __future__ import annotations

import argparse
import json

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment

from pea import ops
from pea.io.redact import mask_logging, masked_errors, redact
from pea.spec import SpecError
from pea.spec.discovery import SCAN_TAG

TRAIN_DEPLOYMENT = "pea/train-language"
UNFINISHED = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]


def unfinished_languages(deployment: str = TRAIN_DEPLOYMENT) -> dict[str, str]:
    """language -> id of a run of `deployment` that has not finished yet."""
    with get_client(sync_client=True) as client:
        target = client.read_deployment_by_name(deployment)
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[target.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=UNFINISHED))))
    return {run.parameters.get("language"): str(run.id) for run in runs}


@flow(name="pea-scan", log_prints=True, retries=0)
def scan_languages(profile: str | None = None, deployment: str = TRAIN_DEPLOYMENT) -> dict:
    """Start `deployment` for each due language of data/languages/ (with `profile`); report the others."""
    mask_logging()  # what this run logs (Prefect's handlers), tracebacks included, is masked
    with masked_errors():  # and the error it fails with, as Prefect logs and stores it
        return _scan(profile, deployment)


def _scan(profile: str | None, deployment: str) -> dict:
    scan = ops.due_languages(profile)
    busy = unfinished_languages(deployment)
    started, rows = {}, []
    for due in scan.due:
        if due.language in busy:
            rows.append({"language": due.language, "action": f"already queued or running ({busy[due.language]})",
                         "reason": due.reason})
            continue
        run = run_deployment(deployment, parameters={"language": due.language, "profile": profile}, timeout=0,
                             as_subflow=False, tags=[SCAN_TAG])
        started[due.language] = str(run.id)
        rows.append({"language": due.language, "action": f"started {run.name} ({run.id})", "reason": due.reason})
        print(redact(f"{due.language}: started {deployment} run {run.name} — {due.reason}"))
    rows += [{"language": d.language, "action": "none", "reason": d.reason} for d in scan.up_to_date]
    rows += [{"language": lang, "action": "none: invalid spec", "reason": err} for lang, err in scan.invalid.items()]
    create_table_artifact(key="language-scan", table=[{k: redact(v) for k, v in r.items()} for r in rows],
                          description="what the language scan started, and why")
    if scan.invalid:
        # The valid languages were handled above; fail the scan so the broken spec is noticed.
        raise SpecError("invalid spec(s), fix them and the next scan picks them up:\n" + "\n".join(scan.invalid.values()))
    return {"started": started, "busy": {d.language: busy[d.language] for d in scan.due if d.language in busy},
            "up_to_date": {d.language: d.reason for d in scan.up_to_date}}


def main() -> None:
    parser = argparse.ArgumentParser(description="Start train-language runs for new or changed languages.")
    parser.add_argument("--profile", help="the profile the train-language runs use, e.g. 'embedded'")
    args = parser.parse_args()
    from pea.cli import run_masked

    raise SystemExit(run_masked("pea scan", lambda: print(json.dumps(scan_languages(args.profile), indent=2))))


if __name__ == "__main__":
    main()
