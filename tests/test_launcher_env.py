"""`<run>/.deepspeed_env` holds the tokens a multi-node launch forwards: written owner-only for the launch, removed
when it ends, in success as in failure (tests/test_secrets.py: failure). DeepSpeed's real multi-node runner (pdsh
flavour) runs it; pdsh itself is a stand-in that keeps what the file held and its mode, then exits as asked."""

import os
import stat

import pytest

from pea.embed import launcher
from pea.spec import LauncherSpec


@pytest.mark.parametrize("exit_code", [0, 5])
def test_the_env_file_is_owner_only_while_the_launch_runs_and_gone_after(tmp_path, monkeypatch, exit_code):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pdsh").write_text("#!/bin/sh\ncp .deepspeed_env ../env-seen; stat -c %a .deepspeed_env > ../env-mode\n"
                                  f"exit {exit_code}\n")
    (bin_dir / "pdsh").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-0123456789")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-0 slots=1\nnode-1 slots=1\n")
    layout = LauncherSpec(num_gpus=1, num_nodes=2, hostfile=str(hostfile), master_addr="127.0.0.1", master_port=29512)
    command = launcher.deepspeed_command(layout, "pea.train", "train.launcher")
    command.insert(1, "--no_ssh_check")
    workdir = tmp_path / "run"
    workdir.mkdir(mode=0o700)
    if exit_code:
        with pytest.raises(launcher.LaunchError, match=f"exited with code {exit_code}"):
            launcher.run(command, layout, workdir)
    else:
        launcher.run(command, layout, workdir)
    assert "MLFLOW_TRACKING_TOKEN=tok-0123456789" in (tmp_path / "env-seen").read_text()
    assert (tmp_path / "env-mode").read_text().strip() == "600"
    assert not (workdir / ".deepspeed_env").exists() and not list(workdir.glob(".*deepspeed_env*"))
