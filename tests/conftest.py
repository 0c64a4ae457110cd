"""Shared test settings: small thread counts on 2-core machines, no network, runs under tmp dirs."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    except ImportError:  # pragma: no cover
        pass
    yield


@pytest.fixture
def mame_root(tmp_path, monkeypatch):
    """Point paths.root (data, caches, outputs) at a fresh folder."""
    monkeypatch.setenv("MAME_ROOT", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node SLURM cluster (munged, slurmctld, slurmd) for this session; skips with the reason
    when the binaries are missing or the tests do not run as root. Its slurm.conf reaches every
    SLURM command (also those submitit runs) through SLURM_CONF."""
    import slurm_cluster as cluster_lib

    reason = cluster_lib.unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster_lib.stop_stale_sessions()
    cluster = cluster_lib.start_cluster(tmp_path_factory.mktemp("slurm"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(cluster.conf))
        try:
            yield cluster
        finally:
            cluster_lib.stop_cluster(cluster)
