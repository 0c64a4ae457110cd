"""Raw DICOMs -> training-ready text-to-image and inpainting sets, as MAM-E prepares them.

Each record from a source is read, filtered, oriented (chest wall on the left), resized and
centre-cropped, described (view, density, breast-area class -> prompt) and written to
``text2image/`` when healthy or ``inpaint/`` (with a lesion mask) when it carries boxes. Every
item ends with a JSON sidecar written last and keyed by a fingerprint of its record, its file
and the settings: a killed run resumes where it stopped, a finished run re-runs as a no-op, and
a changed setting redoes exactly the items it touches. The layout is documented in
docs/architecture.md ("Prepared set on disk").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from mame_lightning.data.prepare.item import prepare_item, shown_path
from mame_lightning.data.records import ImageRecord, Rejection
from mame_lightning.data.prepare.report import TASKS, write_json, write_prepared_set

log = logging.getLogger(__name__)

PREPARATION_VERSION = 2  # bump when a change to the item pipeline must redo finished items
ITEMS_DIR = ".items"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def safe_id(image_id: str) -> str:
    """The id as a file name: unchanged when already safe, else sanitised plus a short hash."""
    image_id = str(image_id)
    if _SAFE_ID.match(image_id):
        return image_id
    digest = hashlib.sha256(image_id.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', image_id)[:100].lstrip('.')}-{digest}"


def plain(node):
    """A config node as plain Python containers (interpolations resolved)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def build_settings(dataset: DictConfig, preparation: DictConfig) -> dict:
    """Everything that shapes an item's outputs (and so its fingerprint), as plain JSON.

    The source's own options are not part of it: what they change reaches the fingerprint
    through the records they produce and the files those point to.
    """
    return {
        "version": PREPARATION_VERSION,
        "dataset": str(dataset.name),
        "size": int(preparation.size),
        "area_thresholds": [float(t) for t in preparation.area_thresholds],
        "area_labels": [str(label) for label in preparation.area_labels],
        "density_words": {str(k): str(v) for k, v in plain(preparation.density_words).items()},
        "check_orientation": bool(preparation.get("check_orientation", True)),
        "templates": {str(k): str(v) for k, v in plain(dataset.templates).items()},
        "filters": plain(dataset.get("filters")) or {},
        "path_salt": str(preparation.get("path_salt") or ""),
        "max_pixels": int(preparation.get("max_pixels") or 0),
        "follow_symlinks": bool(dataset.get("follow_symlinks", False)),
    }


def fingerprint(record: ImageRecord, raw_dir: Path, settings: Mapping) -> str:
    """Changes whenever the record, its file (size, mtime) or a setting changes."""
    try:
        stat = (raw_dir / record.source).stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
    except OSError:
        stamp = None
    payload = json.dumps({"record": record.to_dict(), "file": stamp, "settings": settings},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def sidecar_path(out_dir: Path, item_id: str) -> Path:
    return out_dir / ITEMS_DIR / f"{item_id}.json"


def output_files(outcome: Mapping) -> list[str]:
    """Paths (relative to the prepared dir) a kept item wrote."""
    if outcome.get("status") != "kept":
        return []
    line = outcome["line"]
    return [f"{outcome['task']}/{line[key]}" for key in ("file_name", "mask") if key in line]


def finished_outcome(out_dir: Path, item_id: str, expected: str) -> dict | None:
    """The stored outcome of an item finished with the same fingerprint and outputs on disk."""
    try:
        outcome = json.loads(sidecar_path(out_dir, item_id).read_text())
    except (OSError, ValueError):
        return None
    if outcome.get("fingerprint") != expected:
        return None
    if not all((out_dir / rel).is_file() for rel in output_files(outcome)):
        return None
    return outcome


def run_item(job: tuple) -> dict:
    """Worker entry: prepare one item, then write its sidecar (last, so it marks completion)."""
    record, raw_dir, out_dir, settings, item_id, item_fingerprint = job
    outcome = prepare_item(record, Path(raw_dir), Path(out_dir), settings, item_id)
    outcome = {"id": item_id, "file": record.source, "fingerprint": item_fingerprint, **outcome}
    write_json(sidecar_path(Path(out_dir), item_id), outcome)
    return outcome


def _duplicate(record: ImageRecord, item_id: str, raw_dir: Path, settings: Mapping) -> dict:
    shown, _ = shown_path(record, raw_dir, settings)
    outcome = {"id": item_id, "file": shown, "status": "rejected", "task": None,
               "kind": "duplicate id", "reason": f"id {item_id} already used by another file"}
    return outcome if shown == record.source else {**outcome, "scrubbed": True}


def plan_items(records: Iterable[ImageRecord | Rejection], raw_dir: Path, out_dir: Path,
               settings: Mapping) -> tuple[list[tuple], list[dict]]:
    """Split records into jobs still to run and outcomes already settled (finished items,
    duplicates, and entries the source already rejected)."""
    jobs, done, seen = [], [], set()
    for record in records:
        if isinstance(record, Rejection):
            done.append(record.outcome())
            continue
        item_id = safe_id(record.image_id)
        if item_id in seen:
            done.append(_duplicate(record, item_id, raw_dir, settings))
            continue
        seen.add(item_id)
        item_fingerprint = fingerprint(record, raw_dir, settings)
        finished = finished_outcome(out_dir, item_id, item_fingerprint)
        if finished is not None:
            done.append(finished)
        else:
            jobs.append((record, str(raw_dir), str(out_dir), settings, item_id, item_fingerprint))
    return jobs, done


def exit_with_parent() -> None:
    """End this worker as soon as the process that started it is gone.

    A pool's workers otherwise outlive a parent killed with SIGKILL (nothing closes their queue),
    and keep the resource tracker alive with them. The parent's sentinel becomes ready when it dies.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def worker_setup() -> None:
    """Worker initializer: one thread per worker (N workers share N cores, not N x threads each),
    and exit with the parent."""
    for name in THREAD_VARIABLES:  # for libraries the worker loads itself
        os.environ[name] = "1"
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    exit_with_parent()


# Threads a fork may leave behind: tqdm's monitor only sleeps and takes tqdm's own lock, which
# workers never use.
HARMLESS_THREADS = ("tqdm_monitor",)


def start_method() -> str:
    """``fork`` where it is safe: workers then share the parent's imported modules instead of
    importing the package again (about a second per pool). Not after CUDA started or while other
    threads run (a child could inherit a lock held mid-operation): ``forkserver`` then, which
    imports the item pipeline once for all workers, else ``spawn``."""
    methods = multiprocessing.get_all_start_methods()
    torch = sys.modules.get("torch")
    cuda = torch is not None and torch.cuda.is_initialized()
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and t.name not in HARMLESS_THREADS]
    if sys.platform == "linux" and "fork" in methods and not others and not cuda:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


@contextlib.contextmanager
def worker_pool(num_workers: int, num_jobs: int) -> Iterator[ProcessPoolExecutor | None]:
    """The run's one pool of worker processes, started before anything else (a progress bar's
    thread) runs; None for 0/1 workers or a single job (items then run in-process)."""
    if num_workers <= 1 or num_jobs <= 1:
        yield None
        return
    method = start_method()
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload([__name__])
    log.info("starting %d worker processes (%s)", min(num_workers, num_jobs), method)
    pool = ProcessPoolExecutor(min(num_workers, num_jobs), mp_context=context, initializer=worker_setup)
    try:
        with _broken_pool_hint():
            pool.submit(os.getpid).result()  # starts every worker now (fork starts them all at once)
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _broken_pool_hint() -> Iterator[None]:
    try:
        yield
    except BrokenProcessPool as err:
        raise RuntimeError(
            "preparation worker processes died; a script that prepares data must guard its entry "
            "with `if __name__ == \"__main__\":` (or set preparation.num_workers=0)") from err


def run_jobs(jobs: list[tuple], pool: ProcessPoolExecutor | None, chunk_size: int) -> Iterator[dict]:
    """Outcomes of the jobs in job order (the same outputs whatever the worker count): in-process
    without a pool, else handed out ``chunk_size`` at a time to whichever worker is free."""
    if pool is None:
        yield from map(run_item, jobs)
        return
    with _broken_pool_hint():
        yield from pool.map(run_item, jobs, chunksize=max(1, chunk_size))


def remove_stale(out_dir: Path, outcomes: list[Mapping]) -> int:
    """Delete outputs no current item owns (items dropped or re-routed, temp files of a killed run)."""
    keep = {out_dir / rel for o in outcomes for rel in output_files(o)}
    keep |= {sidecar_path(out_dir, o["id"]) for o in outcomes if "fingerprint" in o}
    folders = [out_dir / ITEMS_DIR] + [out_dir / task / sub for task in TASKS for sub in ("images", "masks")]
    removed = 0
    for folder in folders:
        for path in folder.glob("*") if folder.is_dir() else []:
            if path.is_file() and path not in keep:
                path.unlink()
                removed += 1
    for folder in [out_dir, *(out_dir / task for task in TASKS)]:  # temp files of a killed write
        for path in folder.glob(".*.tmp"):
            path.unlink(missing_ok=True)
    return removed


def _density_order(settings: Mapping) -> list[str]:
    return [settings["density_words"][k] for k in sorted(settings["density_words"])]


def prepare_dataset(cfg: DictConfig) -> dict:
    """Prepare ``cfg.dataset`` with ``cfg.preparation``; returns the report (also in report.json)."""
    from hydra.utils import instantiate

    started = time.monotonic()
    dataset, preparation = cfg.dataset, cfg.preparation
    raw_dir = Path(str(dataset.raw_dir)).expanduser().resolve()
    out_dir = Path(str(dataset.prepared_dir)).expanduser().resolve()
    settings = build_settings(dataset, preparation)
    source = instantiate(dataset.source)
    records = list(source.records(raw_dir))
    out_dir.mkdir(parents=True, exist_ok=True)

    jobs, outcomes = plan_items(records, raw_dir, out_dir, settings)
    reused = sum("fingerprint" in o for o in outcomes)  # finished items (not duplicates or rejections)
    log.info("preparing %s: %d records, %d already prepared", settings["dataset"], len(records), reused)
    workers = int(preparation.get("num_workers", 0) or 0)
    with worker_pool(workers, len(jobs)) as pool:
        progress = tqdm(total=len(outcomes) + len(jobs), initial=len(outcomes), desc=f"prepare {settings['dataset']}",
                        unit="img", dynamic_ncols=True, disable=preparation.get("progress", True) is False)
        with progress:
            for outcome in run_jobs(jobs, pool, int(preparation.get("chunk_size", 1))):
                outcomes.append(outcome)
                progress.update(1)
    remove_stale(out_dir, outcomes)

    run = {"raw_dir": str(raw_dir), "prepared_dir": str(out_dir), "num_workers": workers,
           "reused": reused, "processed": len(jobs)}
    orders = {"densities": _density_order(settings), "areas": settings["area_labels"]}
    config = {**settings, "source": plain(dataset.source)}
    return write_prepared_set(out_dir, outcomes, config, run, time.monotonic() - started, orders)


PREPARE_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "prepare.yaml"


def with_preparation_defaults(cfg: DictConfig) -> DictConfig:
    """``cfg`` with the ``preparation:`` block of conf/prepare.yaml added when it has none.

    Training configs hold a dataset but no preparation settings; they get the shipped defaults,
    so a set prepared on first use equals one made by ``python -m mame_lightning.prepare``.
    """
    if cfg.get("preparation") is not None:
        return cfg
    defaults = OmegaConf.load(PREPARE_CONFIG).preparation
    return OmegaConf.merge(OmegaConf.create({"preparation": defaults}), cfg)


def summary_text(report: Mapping, prepared_dir: str | Path) -> str:
    """A few human lines: counts per task and per drop reason, and where the set is."""

    def by_kind(counts: Mapping) -> str:
        return f" ({', '.join(f'{k} {n}' for k, n in counts.items())})" if counts else ""

    counts = report["counts"]
    kept = ", ".join(f"{task} {n}" for task, n in counts["kept"].items())
    return "\n".join([
        f"prepared {report['config']['dataset']}: {counts['in']} in, {report['kept']} kept ({kept})",
        f"  filtered {len(report['filtered'])}{by_kind(counts['filtered'])}",
        f"  rejected {len(report['rejected'])}{by_kind(counts['rejected'])}",
        f"  orientation disagreements {counts['orientation_disagreements']}, "
        f"lesions outside crop {counts['lesions_outside_crop']}, "
        f"paths hidden for patient identity {counts.get('scrubbed_paths', 0)}",
        f"  output: {Path(str(prepared_dir)).expanduser().resolve()}",
    ])


def prepare_from_config(cfg: DictConfig, echo: bool = True) -> dict:
    """Prepare the set ``cfg.dataset`` describes; used by the CLI and by training on first use.

    The summary is logged, and printed too when ``echo`` (callers without logging set up).
    """
    cfg = with_preparation_defaults(cfg)
    report = prepare_dataset(cfg)
    text = summary_text(report, cfg.dataset.prepared_dir)
    log.info(text)
    if echo:
        print(text, flush=True)
    return report


__all__ = ["PREPARATION_VERSION", "build_settings", "fingerprint", "prepare_dataset",
           "prepare_from_config", "safe_id", "with_preparation_defaults"]
