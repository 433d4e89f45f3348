"""A resume unpickles DeepSpeed checkpoints, so it takes only a run directory that this user owns and nobody else can
write (pea.train.checkpoints.check_private, called by pea.train before it picks a tag); a run directory is created 0700
whatever the umask, and an existing one is judged by what it is, not by the mode mkdir was asked for."""

import os
import stat

import pytest

from pea.train import checkpoints


def _run_with_checkpoint(root):
    run = checkpoints.run_directory(root / "runs" / "r1")
    tag = run / "checkpoints" / "step00000020"
    tag.mkdir(parents=True, mode=0o700)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"pickle")
    return run, tag


def test_a_run_directory_is_created_owner_only_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        run = checkpoints.run_directory(tmp_path / "lake" / "zh" / "runs" / "r1")
    finally:
        os.umask(old)
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    run.chmod(0o775)
    assert checkpoints.run_directory(run) == run and stat.S_IMODE(run.stat().st_mode) == 0o775  # left as it was
    with pytest.raises(PermissionError, match=rf"{run} is writable by group \(mode 775\).*chmod -R go-w {run}"):
        checkpoints.check_private(run)  # ... and judged by what it is


@pytest.mark.parametrize("where, change, why", [
    ("run", lambda p: p.chmod(0o777), "is writable by group and others"),
    ("tag", lambda p: p.chmod(0o722), "is writable by group and others"),
    ("file", lambda p: p.chmod(0o602), "is writable by others"),
    ("file", lambda p: (p.unlink(), p.symlink_to("/etc/hostname")), "is a symbolic link"),
])
def test_a_checkpoint_others_could_have_written_is_refused_naming_it(tmp_path, where, change, why):
    run, tag = _run_with_checkpoint(tmp_path)
    checkpoints.check_private(run)  # as created: trusted
    path = {"run": run, "tag": tag, "file": tag / "mp_rank_00_model_states.pt"}[where]
    change(path)
    with pytest.raises(PermissionError) as raised:
        checkpoints.check_private(run)
    message = str(raised.value)
    assert message.startswith(f"{path} {why}") and "pickles" in message and "new run directory" in message


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_checkpoint_owned_by_another_user_is_refused(tmp_path):
    run, tag = _run_with_checkpoint(tmp_path)
    os.chown(tag / "mp_rank_00_model_states.pt", 4242, 4242)
    with pytest.raises(PermissionError, match=r"mp_rank_00_model_states.pt is owned by uid 4242, not you"):
        checkpoints.check_private(run)


def test_training_refuses_to_resume_from_a_shared_run_directory(zh_spec, tmp_path):
    """The real pea.train.train, up to the refusal: a run directory others can write is not resumed from."""
    from pea import embed, train
    from pea.corpus.synthetic import all_scenes, write_pairs

    pairs = write_pairs(tmp_path, zh_spec, all_scenes()[:12])
    embedded = embed.embed(zh_spec, tmp_path, pairs)
    run, _ = _run_with_checkpoint(tmp_path)
    run.chmod(0o777)
    with pytest.raises(PermissionError, match=rf"^{run} is writable by group and others"):
        train.train(zh_spec, pairs, embedded, run)
