"""What lightning.Trainer costs: the same module object driven by the Trainer and by a bare loop.

The bare loop calls the module's own `training_step`, then backward, the optimizer and LR
scheduler from its own `configure_optimizers`, on the same batches from the same data module.
Rounds alternate between the two drivers, so changes in machine load hit both alike.

    python bench/bench_overhead.py [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

import setups
from bench_train import ClockCallback, Setup, Variant, build_ours, trainer_for
from common import (StepClock, add_common_args, cycle, device_info, device_label, finish_args, format_table,
                    make_record, per_second, quiet_warnings, ratio, ratio_line, record_result, resolve_device,
                    step_stats)

NAME = "overhead"


def bare_loop(module, optimizer, scheduler, batches, setup: Setup, device: torch.device) -> StepClock:
    """training_step + backward + optimizer step, nothing else (what Lightning's loop does for us)."""
    amp_dtype = setups.autocast_dtype(setup.precision)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    clock = StepClock(setup.warmup, device)
    module.to(device)  # Trainer.fit's teardown moves the module back to the CPU
    module.train()
    for index in range(setup.warmup + setup.steps):
        batch = move_data_to_device(next(batches), device)
        autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with autocast:
            loss = module.training_step(batch, index)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clock.mark()
    return clock


def trainer_loop(module, datamodule, setup: Setup, device: torch.device) -> StepClock:
    clock = StepClock(setup.warmup, device)
    trainer = trainer_for(device, setup.precision, setup.warmup + setup.steps, [ClockCallback(clock)])
    trainer.fit(module, datamodule=datamodule)
    module.trainer = None  # detach, so the next bare round runs the module on its own again
    return clock


def measure(setup: Setup, device: torch.device, cache_dir: Path, latent_cache: Path, rounds: int) -> list[dict]:
    components = setups.tiny_model(cache_dir, size=setup.size, precision=setup.precision)
    module, datamodule = build_ours(components, setup, Variant("ours+cache", "ours", cache=True), latent_cache)
    components.vae.to(device)
    datamodule.setup("fit")
    module.to(device)
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    batches = cycle(datamodule.train_dataloader())
    times = {"bare loop": ([], []), "lightning.Trainer": ([], [])}
    for number in range(rounds):
        print(f"[overhead] round {number + 1}/{rounds} ...", flush=True)
        for name, clock in (("bare loop", bare_loop(module, optimizer, scheduler, batches, setup, device)),
                            ("lightning.Trainer", trainer_loop(module, datamodule, setup, device))):
            times[name][0].extend(clock.intervals())
            times[name][1].extend(clock.cpu_intervals())
    rows = []
    for name, (wall, cpu) in times.items():
        wall_stats, cpu_stats = step_stats(wall), step_stats(cpu)
        rows.append({"driver": name, "batch": setup.batch, "images_per_s": per_second(setup.batch, wall_stats["median_s"]),
                     "step_s": wall_stats["median_s"], "step_mean_s": wall_stats["mean_s"],
                     "cpu_step_s": cpu_stats["median_s"], "steps_timed": wall_stats["n"]})
    bare = rows[0]
    for row in rows:
        row["vs_bare"] = ratio(row["images_per_s"], bare["images_per_s"])
        row["overhead_pct"] = 100.0 * (row["step_s"] / bare["step_s"] - 1.0)
        row["cpu_overhead_pct"] = 100.0 * (row["cpu_step_s"] / bare["cpu_step_s"] - 1.0)
    return rows


COLUMNS = [("driver", "driver"), ("batch", "batch"), ("images_per_s", "img/s"), ("step_s", "s/step"),
           ("vs_bare", "vs bare"), ("overhead_pct", "overhead %"), ("cpu_step_s", "CPU s/step"),
           ("cpu_overhead_pct", "CPU overhead %"), ("steps_timed", "steps")]


def run(args) -> dict:
    import tempfile

    device = resolve_device(args.device)
    facts = device_info(device)
    precision = args.precision or ("16-mixed" if device.type == "cuda" else "32")
    size, batch, steps, warmup = (32, 4, 3, 1) if args.quick else (args.size, args.batch, args.steps, args.warmup)
    prepared = (setups.prepared_set(args.work_dir, size=size, n=16, height=256, width=208) if args.quick
                else setups.prepared_set(args.work_dir, size=size, n=48))
    setup = Setup("tiny", size, batch, warmup, steps, prepared, True, precision)
    rounds = 1 if args.quick else args.rounds
    with quiet_warnings(), tempfile.TemporaryDirectory(prefix="latent_cache_", dir=prepared.parent) as cache:
        rows = measure(setup, device, args.cache_dir, Path(cache), rounds)
    lightning_row = rows[1]
    ratios = {"trainer_vs_bare": lightning_row["vs_bare"],
              "trainer_vs_bare_cpu": ratio(rows[0]["cpu_step_s"], lightning_row["cpu_step_s"])}
    facts["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    table = format_table(rows, COLUMNS, title=f"Lightning overhead (same module object) on {device_label(facts)}")
    config = {**{k: str(v) if isinstance(v, Path) else v for k, v in asdict(setup).items()}, "rounds": rounds,
              "latent_cache": True, "quick": args.quick}
    record_result(args, NAME, make_record(NAME, facts, config, rows, ratios))
    print(table)
    print(ratio_line(NAME, ratios), flush=True)
    return {"name": NAME, "rows": rows, "ratios": ratios, "table": table}


def parser() -> argparse.ArgumentParser:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and driver")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precision", choices=sorted(setups.PRECISIONS), default=None)
    return p


def main(argv: list[str] | None = None) -> dict:
    return run(finish_args(parser().parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
