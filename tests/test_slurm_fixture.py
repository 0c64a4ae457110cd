"""The SLURM test cluster's clean-up: it stops only daemons of dead sessions that still run their config."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from helpers import slurm_cluster as cluster_lib


def _sleeper(marker: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", marker])
    deadline = time.time() + 30
    while marker not in cluster_lib._cmdline(proc.pid):  # until exec has replaced the forked test process
        assert time.time() < deadline
        time.sleep(0.05)
    return proc


def test_stale_sessions_lose_their_daemons_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster_lib, "STATE_DIR", tmp_path / "state")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    marker = str(tmp_path / "old-session")
    ours, foreign, live_owner = _sleeper(marker), _sleeper(str(tmp_path / "somebody-else")), _sleeper(marker)
    try:
        (tmp_path / "state").mkdir()
        (tmp_path / "state" / f"session-{dead.pid}.json").write_text(json.dumps(
            {"session_pid": dead.pid, "root": marker, "conf": f"{marker}/slurm.conf",
             "pids": {"munged": ours.pid, "slurmd": foreign.pid}}))
        (tmp_path / "state" / f"session-{live_owner.pid}.json").write_text(json.dumps(
            {"session_pid": live_owner.pid, "root": marker, "conf": f"{marker}/slurm.conf",
             "pids": {"munged": live_owner.pid}}))
        cluster_lib.stop_stale_sessions()
        deadline = time.time() + 10
        while ours.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert ours.poll() is not None, "the dead session's daemon is stopped"
        assert foreign.poll() is None, "a PID that no longer runs that session's config is left alone"
        assert live_owner.poll() is None, "a live session's daemons are left alone"
        assert [p.name for p in (tmp_path / "state").iterdir()] == [f"session-{live_owner.pid}.json"]
    finally:
        for proc in (ours, foreign, live_owner):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_the_cluster_config_keeps_everything_under_its_folder(tmp_path):
    text = cluster_lib.slurm_conf_text(tmp_path, "node1", (16817, 16818))
    paths = [line.split("=", 1)[1] for line in text.splitlines()
             if line.split("=", 1)[0].endswith(("Location", "Dir", "File", "Config"))]
    assert paths and all(p.startswith(str(tmp_path)) for p in paths)
    assert "SlurmctldPort=16817" in text and "ProctrackType=proctrack/linuxproc" in text
