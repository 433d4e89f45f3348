"""Operations on a real Prefect server on loopback: scripts/serve.sh, the deployments of prefect.yaml, a process
worker, `prefect deployment run pea/train-language --watch`, caching across runs, the language scan, the
cluster pool's job template; then scripts/stop.sh. Run alone with `python -m pytest -m deploy`."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.settings import PREFECT_API_URL, temporary_settings

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))

pytestmark = pytest.mark.deploy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.tracking = f"sqlite:///{root}/tracking/mlflow.db"
        self.env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "PREFECT_API_URL": self.api,
                    "PEA_PORT": str(self.port), "PEA_SERVE_DIR": str(root / "serve"), "PEA_LAKE": str(root / "lake"),
                    "MLFLOW_TRACKING_URI": self.tracking, "DO_NOT_TRACK": "1",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "2",
                    "PREFECT_WORKER_PREFETCH_SECONDS": "2", "PREFECT_CLI_WRAP_LINES": "false"}

    def sh(self, *args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(list(args), cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
        return done

    def run_deployment(self, *params: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess, UUID]:
        args = [PREFECT, "deployment", "run", "pea/train-language", "--watch", "--watch-timeout", str(int(timeout))]
        for p in params:
            args += ["-p", p]
        done = self.sh(*args, timeout=timeout + 30, check=False)
        match = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout)
        assert match, f"no flow run created:\n{done.stdout}\n{done.stderr}"
        return done, UUID(match.group(1))

    def client(self):
        return _ClientScope(self.api)


class _ClientScope:
    def __init__(self, api: str):
        self.api = api

    def __enter__(self):
        self.settings = temporary_settings({PREFECT_API_URL: self.api})
        self.settings.__enter__()
        self.client = get_client(sync_client=True)
        return self.client.__enter__()

    def __exit__(self, *exc):
        self.client.__exit__(*exc)
        self.settings.__exit__(*exc)


def _task_states(served: Served, flow_run_id: UUID) -> dict[str, str]:
    with served.client() as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


def _log_text(served: Served, flow_run_id: UUID) -> str:
    with served.client() as client:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    served = Served(tmp_path_factory.mktemp("deploy"))
    try:
        started = time.monotonic()
        out = served.sh("sh", "scripts/serve.sh", timeout=240)
        print(f"serve.sh: {time.monotonic() - started:.0f} s\n{out.stdout}")
        yield served
    finally:
        stopped = served.sh("sh", "scripts/stop.sh", timeout=120, check=False)
        print(stopped.stdout, stopped.stderr)
        assert "worker: stopped" in stopped.stdout and "server: stopped" in stopped.stdout
        assert stopped.stdout.index("worker") < stopped.stdout.index("server")


def _deployment_run(served: Served, *params: str) -> UUID:
    started = time.monotonic()
    done, flow_run_id = served.run_deployment(*params)
    print(f"deployment run {' '.join(params)}: {time.monotonic() - started:.0f} s")
    assert done.returncode == 0, f"run failed:\n{done.stdout[-6000:]}\n{_log_text(served, flow_run_id)[-6000:]}"
    return flow_run_id


@pytest.fixture(scope="module")
def first_run(served) -> UUID:
    return _deployment_run(served, "language=zh")


@pytest.fixture(scope="module")
def second_run(served, first_run, tmp_path_factory) -> UUID:
    """The operator's path, without the project's scripts or PEA_HOME (PEA_LAKE only keeps the test's lake apart):
    `prefect deploy --all` in the checkout, `prefect worker start --pool pea-local` from another directory (another
    shell), then the run.
    A shorter training: the override changes only the train section, so acquire/filter/embed keep their keys."""
    served.sh("sh", "scripts/stop.sh", "worker", timeout=90)
    plain = {k: v for k, v in served.env.items() if not k.startswith("PEA_")}
    elsewhere = tmp_path_factory.mktemp("operator-shell")
    deployed = subprocess.run([PREFECT, "deploy", "--all"], cwd=REPO, env=plain, capture_output=True, text=True,
                              timeout=180)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    with served.client() as client:
        pull = client.read_deployment_by_name("pea/train-language").pull_steps
    assert pull == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}], pull
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "pea-local"], cwd=elsewhere,
                              env={**plain, "PEA_LAKE": served.env["PEA_LAKE"]}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return _deployment_run(served, "language=zh", "steps=30")
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)  # Prefect 3.9's worker exits only on a second signal
            worker.wait(timeout=30)
        served.sh("sh", "scripts/serve.sh", timeout=240)  # serve.sh's worker again, for the tests after this


def test_both_deployments_are_served_with_their_schedules(served):
    with served.client() as client:
        deployments = {f"{d.name}": d for d in client.read_deployments(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=["train-language", "scan-languages"])))}
        train = deployments["train-language"]
        assert train.work_pool_name == "pea-local" and train.enforce_parameter_schema
        assert train.parameter_openapi_schema["required"] == ["language"]
        schedules = {s.parameters["language"]: s for s in train.schedules}
        assert set(schedules) == {"zh", "ja"} and not any(s.active for s in schedules.values())
        assert schedules["zh"].schedule.timezone == "Asia/Shanghai"
        scan = deployments["scan-languages"]
        assert scan.global_concurrency_limit.limit == 1


def test_a_deployment_run_completes_and_registers_a_version(served, first_run):
    first = first_run
    with served.client() as client:
        run = client.read_flow_run(first)
        assert run.state.is_completed()
        keys = {a.key for a in client.read_artifacts() if a.flow_run_id == first}
    assert {"data-quality-zh", "evaluation-zh", "model-zh"} <= keys
    version = MlflowClient(served.tracking).get_model_version("pea-adapter-zh", "1")
    assert version.tags["language"] == "zh" and version.tags["source_fingerprint"]
    # acquire refuses to run off the main thread (img2dataset's SIGINT handler); it ran in the worker's process.
    assert _task_states(served, first)["acquire"] == "Completed"


def test_the_scan_starts_a_run_for_a_language_without_a_champion_and_none_for_one_with(served, first_run):
    assert MlflowClient(served.tracking).get_model_version_by_alias("pea-adapter-zh", "champion")
    served.sh("sh", "scripts/stop.sh", "worker", timeout=90)  # keep the runs it starts queued, not running
    try:
        reports = []
        for i in range(2):
            out = served.root / f"scan{i}.json"
            served.sh(sys.executable, "-c", "import json, sys; from flows.scan_flow import scan_languages; "
                      "json.dump(scan_languages('embedded'), open(sys.argv[1], 'w'))", str(out), timeout=180)
            reports.append(json.loads(out.read_text()))
        first, again = reports
        with served.client() as client:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["train-language"])))
            queued = {r.parameters["language"]: r for r in runs if r.state.is_scheduled()}
            for run in queued.values():
                client.delete_flow_run(run.id)
    finally:
        served.sh("sh", "scripts/serve.sh", timeout=240)  # idempotent: starts the worker again
    assert "ja" in first["started"] and queued["ja"].parameters == {"language": "ja", "profile": "embedded"}, first
    assert "zh" not in first["started"] and first["up_to_date"]["zh"].startswith("champion is up to date"), first
    assert sorted(queued) == sorted(first["started"])  # one run per started language, nothing else
    assert again["started"] == {} and sorted(again["busy"]) == sorted(first["started"]), again


def test_the_second_run_takes_acquire_filter_and_embed_from_the_cache_and_trains_a_new_version(served, first_run,
                                                                                               second_run):
    second = second_run  # first_run only has to have happened
    states = _task_states(served, second)
    assert {states[s] for s in ("acquire", "filter_pairs", "embed")} == {"Cached"}, states
    assert {states[s] for s in ("train", "evaluate", "register")} == {"Completed"}, states
    mlflow = MlflowClient(served.tracking)
    v1, v2 = (mlflow.get_model_version("pea-adapter-zh", v) for v in ("1", "2"))
    assert v2.tags["data_fingerprint"] == v1.tags["data_fingerprint"]
    assert mlflow.get_run(v2.run_id).data.params["train.steps"] == "30"  # the override reached the spec
    results = served.root / "lake" / "prefect-results"
    assert results.is_dir() and any(results.iterdir())


def test_a_second_run_of_the_same_language_waits_for_the_first(served, second_run):
    # "Another run" holds the language's slot, from its own process: Prefect's concurrency and event services
    # are process-wide, and would stay bound to this server after it stops.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from prefect.concurrency.sync import concurrency\n"
         "with concurrency('pea-train-zh', occupy=1, strict=True):\n print('held', flush=True); sys.stdin.read()"],
        cwd=REPO, env=served.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        created = served.sh(PREFECT, "deployment", "run", "pea/train-language", "-p", "language=zh", timeout=60)
        flow_run_id = UUID(re.search(r"UUID: ([0-9a-f-]{36})", created.stdout).group(1))
        deadline = time.monotonic() + 240
        while "waiting for any other run of zh" not in _log_text(served, flow_run_id):
            assert time.monotonic() < deadline, "the run never reached the concurrency limit"
            time.sleep(2)
        time.sleep(8)  # it holds there: no stage starts while the slot is taken
        with served.client() as client:
            assert client.read_flow_run(flow_run_id).state.is_running()
        assert "acquire" not in _task_states(served, flow_run_id)
        served.sh(PREFECT, "flow-run", "cancel", str(flow_run_id), timeout=60)
        while True:
            with served.client() as client:
                if client.read_flow_run(flow_run_id).state.is_final():
                    break
            assert time.monotonic() < deadline + 120, "the waiting run was not cancelled"
            time.sleep(2)
    finally:
        holder.communicate(timeout=60)  # closes stdin: the holder releases the slot and exits
    assert "acquire" not in _task_states(served, flow_run_id)


def test_a_worker_killed_mid_training_then_the_run_retried_resumes_and_registers_once(served, second_run):
    """kill -9 of the worker and its flow run once a checkpoint is sealed; the run marked crashed (what Prefect's
    zombie automation does), `prefect flow-run retry`, a new worker: the same flow run resumes training from the
    checkpoint in its run directory and registers one version."""
    import psutil
    from prefect.states import Crashed

    created = served.sh(PREFECT, "deployment", "run", "pea/train-language", "-p", "language=zh", "-p", "steps=400",
                        timeout=60)
    flow_run_id = UUID(re.search(r"UUID: ([0-9a-f-]{36})", created.stdout).group(1))
    runs = served.root / "lake" / "zh" / "runs"
    deadline = time.monotonic() + 600
    while not list(runs.glob(f"*-{str(flow_run_id)[:8]}/checkpoints/step*/pea-seal.json")):
        assert time.monotonic() < deadline, f"no checkpoint was sealed:\n{_log_text(served, flow_run_id)[-3000:]}"
        time.sleep(0.5)
    worker = psutil.Process(int((Path(served.env["PEA_SERVE_DIR"]) / "worker.pid").read_text()))
    for process in [*worker.children(recursive=True), worker]:
        process.kill()
    psutil.wait_procs([worker], timeout=30)
    (run_dir,) = runs.glob(f"*-{str(flow_run_id)[:8]}")
    assert not (run_dir / "train_result.json").exists()  # killed mid-training
    with served.client() as client:
        assert client.read_flow_run(flow_run_id).state.is_running()  # a kill -9 reports nothing
        client.set_flow_run_state(flow_run_id, Crashed(message="its worker was killed"), force=True)
    served.sh(PREFECT, "flow-run", "retry", str(flow_run_id), timeout=60)
    served.sh("sh", "scripts/serve.sh", timeout=240)  # a new worker
    while True:
        with served.client() as client:
            state = client.read_flow_run(flow_run_id).state
        if state.is_final():
            break
        assert time.monotonic() < deadline + 600, "the retried run did not finish"
        time.sleep(2)
    assert state.is_completed(), _log_text(served, flow_run_id)[-4000:]
    result = json.loads((run_dir / "train_result.json").read_text())
    from pea.spec import load_spec

    total = load_spec("zh", "embedded").train.model_copy(update={"steps": 400}).total_steps  # warm start + 400
    assert result["resumed_from"] >= 100 and result["steps"] == total  # from the sealed checkpoint, same run dir
    versions = MlflowClient(served.tracking).search_model_versions("name = 'pea-adapter-zh'")
    mine = [v for v in versions if MlflowClient(served.tracking).get_run(v.run_id).info.run_name == run_dir.name]
    assert len(mine) == 1, [(v.version, v.run_id) for v in mine]


def test_an_unknown_language_fails_fast_naming_the_known_ones_without_retries(served):
    started = time.monotonic()
    done, flow_run_id = served.run_deployment("language=xx", timeout=120)
    assert done.returncode != 0 and "Failed" in done.stdout
    with served.client() as client:
        run = client.read_flow_run(flow_run_id)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert "no spec for language 'xx'" in run.state.message and re.search(r"known languages: .*ja.*zh", run.state.message)
    assert [(t.name.rsplit("-", 1)[0], t.run_count) for t in tasks] == [("load_language", 1)]
    assert time.monotonic() - started < 90
    # A malformed code is refused by the parameter schema before any run is created.
    bad = served.sh(PREFECT, "deployment", "run", "pea/train-language", "-p", "language=Chinese!", timeout=60,
                    check=False)
    assert bad.returncode != 0 and "UUID" not in bad.stdout


def test_the_cluster_pool_takes_the_job_template_and_the_cluster_deployments(served):
    served.sh(PREFECT, "work-pool", "create", "pea-k8s", "--type", "kubernetes", "--base-job-template",
              "flows/k8s/base-job-template.json", timeout=60)
    env = {"PEA_GIT_REPOSITORY": "https://example.invalid/pea.git", "PEA_GIT_BRANCH": "main"}
    served.env.update(env)
    try:
        served.sh(PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", "flows/k8s/prefect.yaml", timeout=120)
    finally:
        for key in env:
            served.env.pop(key)
    with served.client() as client:
        pool = client.read_work_pool("pea-k8s")
        deployment = client.read_deployment_by_name("pea/train-language")
    container = pool.base_job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    # The cluster deployment replaced the local one of the same name: same flow, other pool, git pull steps.
    assert deployment.work_pool_name == "pea-k8s" and deployment.job_variables["gpu_count"] == 1
    assert deployment.pull_steps[0]["prefect.deployments.steps.git_clone"]["repository"] == env["PEA_GIT_REPOSITORY"]
