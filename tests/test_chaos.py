"""Chaos in CI (issue #18): benchmarks/chaos.py with one trial per fault on a subset of the faults (the benchmark
runs every fault with more trials: docs/reliability.md). Each trial kills, fills the disk under, or corrupts a
stage run in a child process, reruns it, and compares with an undisturbed reference run."""


import bench
import pytest

pytestmark = pytest.mark.chaos

FAULTS = ["kill:embed", "kill:train", "kill:register", "disk:embed", "disk:pack", "disk:train", "corrupt:store",
          "corrupt:checkpoint", "shared:teacher"]


def _benchmark():
    return bench.load("chaos")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    chaos = _benchmark()
    return chaos, chaos.campaign(FAULTS, trials=1, work=tmp_path_factory.mktemp("chaos"), seed=0)


@pytest.mark.parametrize("fault", FAULTS)
def test_the_rerun_after_the_fault_equals_the_undisturbed_run(outcomes, fault):
    chaos, found = outcomes
    (outcome,) = [o for o in found if o["fault"] == fault]
    assert outcome["landed"], f"the fault did not happen: {outcome}"  # the kill hit a running stage, or the error came
    assert outcome["rerun"] and outcome["identical"], outcome
    assert not outcome["partial"] and not outcome["duplicates"], outcome
    assert outcome.get("clear_error", True), f"unclear error: {outcome['message']}"
    if fault == "corrupt:checkpoint":  # detected, not merely survived: the corrupted tag skipped by name, and why
        train = chaos.OVERRIDES["train"]
        newest = round(train["steps"] * (1 + train["token_warmup"]))  # the warm start's steps count too
        assert outcome["resumed_from"] == newest - train["checkpoint_every"], outcome
        assert outcome["skipped"] == f"step{newest:08d}", outcome
        assert outcome["message"].startswith(f"checkpoint step{newest:08d} skipped:") and "checksum" in outcome["message"]
    assert chaos.passed(outcome)


def test_a_trial_whose_fault_did_not_land_does_not_pass():
    chaos = _benchmark()
    clean = {"fault": "kill:train", "landed": True, "rerun": True, "identical": True, "partial": [], "duplicates": 0}
    assert chaos.passed(clean) and not chaos.passed({**clean, "landed": False})
