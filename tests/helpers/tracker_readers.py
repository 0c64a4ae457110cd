"""Read back what the experiment trackers stored, with their own formats and clients.

W&B: an offline run's `run-<id>.wandb` file is W&B's transaction log (LevelDB log framing: a 7-byte
header, 32 KiB blocks of CRC32-length-type chunks) of `wandb_internal_pb2.Record` messages, the very
file `wandb sync` uploads; W&B's own protobuf schema decodes each record. MLflow: its client on the store.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

WANDB_HEADER = 7  # b":W&B" + magic (2 bytes) + version (1 byte)
WANDB_BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    pos, parts = WANDB_HEADER, []
    while pos + 7 <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < 7:
            pos += left  # block trailer too short for a chunk header
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the next block
            pos += left
            continue
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (FULL, FIRST):
            parts = [payload]
        else:
            parts.append(payload)
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            yield record


def wandb_offline_runs(save_dir: Path) -> list[Path]:
    return sorted(Path(save_dir).glob("wandb/offline-run-*/run-*.wandb"))


def wandb_finished(path: Path, timeout: float = 60.0) -> list:
    """The run's records once its `exit` record is written (W&B's service writes after finish() returns)."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def wandb_history(path: Path) -> list[dict]:
    """Each logged history row as {key: value}, read from the finished run."""
    rows = []
    records = wandb_finished(path)
    assert any(r.WhichOneof("record_type") == "exit" for r in records), f"{path}: the run never finished"
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def mlflow_runs(tracking_uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {tracking_uri}"
    return client, client.search_runs([found.experiment_id])
