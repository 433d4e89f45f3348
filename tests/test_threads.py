"""The per-run thread budget (pea.embed.launcher.thread_budget / apply_thread_budget): what a run and its children use."""

import os
import subprocess
import sys

import pytest

from pea.embed.launcher import thread_budget

CORES = len(os.sched_getaffinity(0))


def test_the_budget_divides_the_cores_by_the_runs_allowed_at_once(monkeypatch):
    monkeypatch.delenv("PEA_THREADS", raising=False)
    assert thread_budget(None) == CORES
    assert thread_budget(CORES) == 1
    assert thread_budget(4 * CORES) == 1  # never zero


def test_pea_threads_overrides_and_a_bad_value_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("PEA_THREADS", "3")
    assert thread_budget(CORES) == 3
    monkeypatch.setenv("PEA_THREADS", "all")
    with pytest.raises(ValueError, match="PEA_THREADS='all' is not a positive integer"):
        thread_budget()


def test_the_budget_reaches_torch_here_and_in_a_child_process():
    code = ("import os, subprocess, sys, torch; from pea.embed.launcher import apply_thread_budget; apply_thread_budget(1); "
            "child = subprocess.run([sys.executable, '-c', 'import torch; print(torch.get_num_threads())'], "
            "capture_output=True, text=True).stdout.strip(); print(torch.get_num_threads(), child)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    assert out.stdout.split() == ["1", "1"], out.stderr
