"""Shared test settings: small thread counts on 2-core machines, no network, runs under tmp dirs."""

import os
from pathlib import Path

import pytest

from helpers.generation import tiny_export
from helpers.training import prepare_small_synthetic

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
    from helpers import slurm_cluster as cluster_lib

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


# Fixtures shared across test modules (their builders live in tests/helpers/).


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: tiny models run many times faster on one thread on a shared 2-core machine
    (modules that want it for every test say `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def models_root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "generation_models"


@pytest.fixture(scope="session")
def t2i_dir(models_root):
    return tiny_export(models_root, "text2image")


@pytest.fixture(scope="session")
def inpaint_dir(models_root):
    return tiny_export(models_root, "inpaint")


@pytest.fixture(scope="module")
def t2i_model(t2i_dir):
    from mame_lightning.pipelines.loading import load_model

    return load_model(t2i_dir, device="cpu")


@pytest.fixture(scope="module")
def inpaint_model(inpaint_dir):
    from mame_lightning.pipelines.loading import load_model

    return load_model(inpaint_dir, device="cpu")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="module")
def small_prepared(tmp_path_factory) -> tuple[Path, Path]:
    """(paths.root, prepared_dir) of the small set, made once per test module."""
    root = tmp_path_factory.mktemp("train_root")
    return root, prepare_small_synthetic(root)


@pytest.fixture(scope="session")
def utility_prepared(tmp_path_factory):
    """The small phantom set through the real preparation (VinDr and OMI-DB folder layouts), once."""
    return prepare_small_synthetic(tmp_path_factory.mktemp("utility_data"))


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny word-level CLIP tokenizer of the prepared-set tests."""
    from helpers.prepared_sets import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def vae():
    """A tiny AutoencoderKL (seed 0) for latent-cache tests."""
    from helpers.prepared_sets import tiny_vae

    return tiny_vae(seed=0)
