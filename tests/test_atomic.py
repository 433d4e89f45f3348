"""pea.io.atomic: an output appears whole or not at all; a full disk names the file; stale temps are swept."""

import errno
import os
import time

import pytest

from pea.io.atomic import NoRoom, publish, sweep, temp_path


def test_an_output_appears_only_when_its_writer_returns(tmp_path):
    target = tmp_path / "pairs.parquet"
    with pytest.raises(ValueError):
        with publish(target, "filter: kept pairs") as tmp:
            tmp.write_text("half")
            raise ValueError("the writer failed")
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temp
    with publish(target, "filter: kept pairs") as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT])
def test_a_full_disk_names_the_output_and_the_fix(tmp_path, code):
    with pytest.raises(NoRoom) as raised:
        with publish(tmp_path / "part-1.parquet", "embed: teacher store part") as tmp:
            tmp.write_text("half")
            raise OSError(code, os.strerror(code))
    message = str(raised.value)
    assert message.startswith(f"embed: teacher store part: no room to write {tmp_path / 'part-1.parquet'}")
    assert "PEA_LAKE" in message and "rerun" in message and raised.value.errno == code
    assert list(tmp_path.iterdir()) == []


def test_sweep_removes_only_stale_temps_of_publish(tmp_path):
    stale, live = temp_path(tmp_path / "shards"), temp_path(tmp_path / "part-2.parquet")
    stale.mkdir()
    live.write_text("a writer is still here")
    other = tmp_path / ".not-ours.tmp"
    other.write_text("x")
    hour_ago = time.time() - 3700
    os.utime(stale, (hour_ago, hour_ago))
    os.utime(other, (hour_ago, hour_ago))
    assert sweep(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])
