"""Training throughput: our LightningModule + lightning.Trainer against the reference loop.

Same model, data, batch, precision and optimizer on both sides; warm-up steps excluded. Variants:
the latent cache on/off (ours), gradient checkpointing on/off, AdamW vs 8-bit AdamW, LoRA (lora=unet, rank 4)
vs full fine-tuning, the memory layout (channels-last UNet; the frozen VAE in NCHW instead of the default NHWC).
Speed ratios are paired by round (`paired_ratio`). Run on the tiny model and on SD v1.5's full-size
architecture (random weights, built once under the cache).

    python bench/bench_train.py [--model tiny|sd15_arch|both] [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import lightning as L
import torch

import setups
from common import (StepClock, add_common_args, device_info, device_label, finish_args, format_table, make_record,
                    per_second, quiet_warnings, ratio, ratio_line, record_result, resolve_device, run_guarded,
                    step_stats)
from memory import PeakMemory, disk_free_mib, memory_available_mib, release_memory
from reference_train_loop import reference_train

NAME = "train"


@dataclass(frozen=True)
class Variant:
    name: str
    path: str  # "ours" or "reference"
    cache: bool = False
    checkpointing: bool = False
    optimizer: str = "adamw"
    lora: str = "none"  # conf/lora/<name>: "unet" trains adapters only (ours)
    channels_last: bool = False  # task.module.channels_last (ours)
    vae_channels_last: bool = True  # task.module.vae_channels_last (ours; the default)

    @property
    def setting(self) -> tuple[bool, str]:
        """What must match for two rows to be compared (the path and cache aside)."""
        return self.checkpointing, self.optimizer


TINY_VARIANTS = (
    Variant("reference", "reference"),
    Variant("ours+cache", "ours", cache=True),
    Variant("ours", "ours"),
    Variant("ours vae-nchw", "ours", vae_channels_last=False),
    Variant("reference+ckpt", "reference", checkpointing=True),
    Variant("ours+cache+ckpt", "ours", cache=True, checkpointing=True),
    Variant("reference 8bit", "reference", optimizer="adamw8bit"),
    Variant("ours+cache 8bit", "ours", cache=True, optimizer="adamw8bit"),
    Variant("ours+cache lora", "ours", cache=True, lora="unet"),
    Variant("ours+cache channels-last", "ours", cache=True, channels_last=True),
)
SD15_VARIANTS = (Variant("reference", "reference"), Variant("ours+cache", "ours", cache=True), Variant("ours", "ours"),
                 Variant("ours+cache lora", "ours", cache=True, lora="unet"))
# measured once and left out of the default run (minutes each at full size); --variants NAME runs them
SD15_EXTRA_VARIANTS = (Variant("ours+cache channels-last", "ours", cache=True, channels_last=True),
                       Variant("ours vae-nchw", "ours", vae_channels_last=False))


@dataclass
class Setup:
    """One model size: where its data is and how it is trained."""

    model: str
    size: int
    batch: int
    warmup: int
    steps: int
    prepared: Path
    train_text_encoder: bool
    precision: str
    num_workers: int = 0


# implementation switches of torch optimizers that diffusers' example scripts do not pass
IMPLEMENTATION_KEYS = ("fused", "foreach")


def optimizer_factory(name: str, reference: bool = False):
    """The partial conf/optimizer/<name>.yaml builds (the trainable parameters come later).

    The reference gets the same hyper-parameters without implementation switches: diffusers'
    train_text_to_image.py builds `torch.optim.AdamW(params, lr, betas, weight_decay, eps)`, torch's
    per-tensor default on the CPU.
    """
    from hydra.utils import instantiate

    config = setups.config_group("optimizer", name)
    if reference:
        for key in IMPLEMENTATION_KEYS:
            config.pop(key, None)
    return instantiate(config)


def load_model(setup: Setup, cache_dir: Path):
    if setup.model == "tiny":
        return setups.tiny_model(cache_dir, size=setup.size, precision=setup.precision,
                                 train_text_encoder=setup.train_text_encoder)
    return setups.sd15_model(cache_dir, precision=setup.precision, train_text_encoder=setup.train_text_encoder)


class ClockCallback(L.Callback):
    def __init__(self, clock: StepClock):
        self.clock = clock

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.mark()


def trainer_for(device: torch.device, precision: str, max_steps: int, callbacks: list) -> L.Trainer:
    """A Trainer as conf/trainer/default.yaml sets it up, minus logging, checkpoints and validation."""
    return L.Trainer(
        accelerator=device.type, devices=[device.index or 0] if device.type == "cuda" else 1,
        precision=setups.lightning_precision(precision), max_steps=max_steps, max_epochs=-1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=10, benchmark=False, callbacks=callbacks,
    )


def train_config(setup: Setup, variant: Variant):
    """conf/train.yaml with this variant's choices: the module is built exactly as training builds it."""
    return setups.compose("train", [
        "task=text2image", f"optimizer={variant.optimizer}", "seed=0",
        f"task.module.gradient_checkpointing={variant.checkpointing}",
        f"task.module.train_text_encoder={setup.train_text_encoder}", f"lora={variant.lora}",
        f"task.module.channels_last={variant.channels_last}",
        f"task.module.vae_channels_last={variant.vae_channels_last}",
    ])


def build_ours(components, setup: Setup, variant: Variant, cache_dir: Path | None):
    from mame_lightning.data.loading.datamodule import PreparedDataModule
    from mame_lightning.models.building import build_module

    module = build_module(train_config(setup, variant), components)
    cache = {"enabled": True, "dir": str(cache_dir), "batch_size": 8} if variant.cache else False
    datamodule = PreparedDataModule(str(setup.prepared), task="text2image", tokenizer=components.tokenizer,
                                    batch_size=setup.batch, num_workers=setup.num_workers, val_fraction=0.0,
                                    seed=0, latent_cache=cache)
    if variant.cache:
        datamodule.set_vae(components.vae)
    return module, datamodule


def run_ours(components, setup: Setup, variant: Variant, device: torch.device,
             cache_dir: Path) -> tuple[StepClock, dict]:
    """Trainer.fit for warmup + steps; the latent cache (if on) is built or reused before, and timed."""
    module, datamodule = build_ours(components, setup, variant, cache_dir)
    if variant.cache:
        components.vae.to(device)  # the cache encodes where training will run
    began = time.perf_counter()
    datamodule.setup("fit")
    extra = {"cache_s": time.perf_counter() - began} if variant.cache else {}
    clock = StepClock(setup.warmup, device)
    trainer = trainer_for(device, setup.precision, setup.warmup + setup.steps, [ClockCallback(clock)])
    trainer.fit(module, datamodule=datamodule)
    extra["loss"] = float(trainer.callback_metrics.get("train/loss", float("nan")))
    extra["trainable_params"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    extra["optimizer_state_mib"] = optimizer_state_mib(trainer.optimizers[0])
    return clock, extra


def optimizer_state_mib(optimizer: torch.optim.Optimizer) -> float:
    """What the optimizer keeps per trained weight (AdamW: two moments), in MiB."""
    tensors = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def run_reference(components, setup: Setup, variant: Variant, device: torch.device,
                  cache_dir: Path) -> tuple[StepClock, dict]:
    from mame_lightning.data.loading.prepared_set import PreparedImageDataset

    dataset = PreparedImageDataset(setup.prepared, "text2image", components.tokenizer)
    clock, losses = reference_train(
        components, dataset, batch_size=setup.batch, steps=setup.steps, warmup=setup.warmup,
        optimizer_factory=optimizer_factory(variant.optimizer, reference=True), device=device, precision=setup.precision,
        gradient_checkpointing=variant.checkpointing, train_text_encoder=setup.train_text_encoder,
        num_workers=setup.num_workers)
    return clock, {"loss": losses[-1]}


def measure_once(setup: Setup, variant: Variant, device: torch.device, model_cache: Path, latent_cache: Path) -> dict:
    """One run of one variant: its step times and the memory it needed (model load included)."""
    release_memory()
    with quiet_warnings(), PeakMemory(device) as memory:
        components = load_model(setup, model_cache)
        runner = run_ours if variant.path == "ours" else run_reference
        clock, extra = runner(components, setup, variant, device, latent_cache)
        del components
    return {"wall": clock.intervals(), "cpu": clock.cpu_intervals(), "peak_mib": memory.peak_mib,
            "peak_delta_mib": memory.delta_mib, "memory_kind": memory.kind, **extra}


def measure_isolated(threads: int, *args) -> dict:
    """measure_once in this (child) process, with the parent's thread count."""
    torch.set_num_threads(threads)
    return measure_once(*args)


def measure_in_child(*args) -> dict:
    """measure_once in a fresh process: its memory is its own, and if the kernel kills it for
    memory (full-size weights on a shared machine) only this variant is lost."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(measure_isolated, torch.get_num_threads(), *args).result()
        except BrokenProcessPool as error:
            raise MemoryError("the measuring process died (killed for memory?)") from error


def summarise(setup: Setup, variant: Variant, runs: list[dict]) -> dict:
    """Pool the step times of every round; the first round's cache time is the build, later ones reuse it."""
    wall = step_stats([t for run in runs for t in run["wall"]])
    round_medians = [step_stats(run["wall"])["median_s"] for run in runs]
    cpu = step_stats([t for run in runs for t in run["cpu"]])
    row = {"model": setup.model, "variant": variant.name, **asdict(variant), "batch": setup.batch,
           "images_per_s": per_second(setup.batch, wall["median_s"]), "step_s": wall["median_s"],
           "step_mean_s": wall["mean_s"], "cpu_s_per_image": cpu["median_s"] / setup.batch,
           "steps_timed": wall["n"], "rounds": len(runs), "peak_mib": max(r["peak_mib"] for r in runs),
           "peak_delta_mib": max(r["peak_delta_mib"] for r in runs), "memory_kind": runs[0]["memory_kind"],
           "loss": runs[-1].get("loss"), "round_step_s": round_medians}
    for key in ("trainable_params", "optimizer_state_mib"):
        if key in runs[-1]:
            row[key] = runs[-1][key]
    if "cache_s" in runs[0]:
        row["cache_build_s"] = runs[0]["cache_s"]
    return row


def measure_setup(setup: Setup, variants, device: torch.device, model_cache: Path, rounds: int,
                  precheck=lambda: None, isolate: bool = False) -> list[dict]:
    """Every variant once per round, rounds interleaved so a change in machine load hits all alike.

    `precheck()` runs before each variant and returns why it cannot run now (e.g. memory other
    processes took since the start), or None.
    """
    runs: dict[str, list[dict]] = {v.name: [] for v in variants}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="latent_cache_", dir=setup.prepared.parent) as latent_cache:
        if setup.model == "tiny":  # one untimed run of each path: imports and first-use allocations
            short = replace(setup, warmup=1, steps=1)
            for variant in (Variant("warm-up", "reference"), Variant("warm-up", "ours")):
                run_guarded("warm-up", functools.partial(measure_once, short, variant, device, model_cache,
                                                         Path(latent_cache) / "warm-up"))
        for number in range(rounds):
            for variant in variants:
                if variant.name in skipped:
                    continue
                print(f"[train] {setup.model} {variant.name} (round {number + 1}/{rounds}) ...", flush=True)
                own_cache = Path(latent_cache) / variant.name.replace(" ", "_").replace("+", "_")
                release_memory()
                why = precheck()
                measure = measure_in_child if isolate else measure_once
                result = {"skipped": why} if why else run_guarded(variant.name, functools.partial(
                    measure, setup, variant, device, model_cache, own_cache))
                if "skipped" in result and runs[variant.name]:
                    print(f"[train] {variant.name}: round {number + 1} not run ({result['skipped']})", flush=True)
                elif "skipped" in result:
                    skipped[variant.name] = result["skipped"]
                else:
                    runs[variant.name].append(result)
    return [summarise(setup, v, runs[v.name]) if v.name not in skipped
            else {"model": setup.model, "variant": v.name, **asdict(v), "skipped": skipped[v.name]} for v in variants]


def paired_ratio(row: dict, ref: dict) -> float | None:
    """Speed vs the reference: the median over rounds of each round's ratio when both ran every round.

    A round runs every variant back to back, so a change in machine speed between rounds (a shared
    machine) cancels in that round's ratio; pooled medians would let a fast round of one side count
    against a slow round of the other. Without per-round figures: the ratio of the pooled medians.
    """
    mine, theirs = row.get("round_step_s"), ref.get("round_step_s")
    if mine and theirs and len(mine) == len(theirs):
        return statistics.median(r / m for r, m in zip(theirs, mine))
    return ratio(row["images_per_s"], ref["images_per_s"])


def compare(rows: list[dict]) -> None:
    """Give each row its speed relative to the reference run with the same setting."""
    references = {(r["model"], r["checkpointing"], r["optimizer"]): r for r in rows
                  if r.get("path") == "reference" and "images_per_s" in r}
    for row in rows:
        ref = references.get((row.get("model"), row.get("checkpointing"), row.get("optimizer")))
        if ref is not None and "images_per_s" in row:
            row["vs_reference"] = paired_ratio(row, ref)
            row["vs_reference_cpu"] = ratio(ref["cpu_s_per_image"], row["cpu_s_per_image"])
            saved = ref["step_s"] - row["step_s"]
            if row.get("cache_build_s") is not None and saved > 0:
                row["break_even_steps"] = row["cache_build_s"] / saved


def summary_ratios(rows: list[dict]) -> dict:
    keys = {"ours+cache": "cache_vs_ref", "ours": "nocache_vs_ref", "ours+cache+ckpt": "ckpt_cache_vs_ref_ckpt",
            "ours+cache 8bit": "8bit_cache_vs_ref_8bit", "ours+cache channels-last": "channels_last_vs_ref",
            "ours vae-nchw": "nocache_vae_nchw_vs_ref"}
    ratios = {f"{r['model']}.{keys[r['variant']]}": r.get("vs_reference") for r in rows if r.get("variant") in keys}
    ratios |= {f"{r['model']}.cache_vs_ref_cpu": r.get("vs_reference_cpu") for r in rows if r.get("variant") == "ours+cache"}
    by_name = {(r.get("model"), r.get("variant")): r for r in rows}
    for model in sorted({r.get("model") for r in rows}):
        plain, ckpt = by_name.get((model, "reference")), by_name.get((model, "reference+ckpt"))
        if plain and ckpt and "peak_delta_mib" in ckpt:
            ratios[f"{model}.ckpt_memory_saving"] = ratio(plain["peak_delta_mib"], ckpt["peak_delta_mib"])
        full, lora = by_name.get((model, "ours+cache")), by_name.get((model, "ours+cache lora"))
        if full and lora and "images_per_s" in full and "images_per_s" in lora:
            ratios[f"{model}.lora_vs_full_speed"] = ratio(lora["images_per_s"], full["images_per_s"])
            ratios[f"{model}.lora_memory_saving"] = ratio(full.get("peak_delta_mib"), lora.get("peak_delta_mib"))
            ratios[f"{model}.lora_optimizer_state_saving"] = ratio(full.get("optimizer_state_mib"),
                                                                   lora.get("optimizer_state_mib"))
    return ratios


COLUMNS = [("model", "model"), ("variant", "variant"), ("batch", "batch"), ("images_per_s", "img/s"),
           ("step_s", "s/step"), ("vs_reference", "vs ref"),
           ("cpu_s_per_image", "CPU s/img"), ("vs_reference_cpu", "vs ref (CPU)"), ("peak_delta_mib", "peak +MiB"),
           ("trainable_params", "trained params"), ("optimizer_state_mib", "optimizer MiB"),
           ("cache_build_s", "cache build s"), ("break_even_steps", "break-even steps"), ("skipped", "note")]


def sd15_fits(setup: Setup, cache_dir: Path, budget_mib: float | None = None) -> str | None:
    """Why the full-size run cannot go ahead here (memory, disk), or None when it can."""
    components_mib = setups.SD15_BYTES / 2**20
    trainable = 860e6 + (123e6 if setup.train_text_encoder else 0)
    need = components_mib + trainable * (4 + 8) / 2**20 + 3000  # grads + AdamW states + activations/slack
    available = memory_available_mib() if budget_mib is None else budget_mib
    if available < need:
        return f"needs ~{need / 1024:.1f} GiB free memory, {available / 1024:.1f} GiB available"
    if not setups.sd15_is_built(cache_dir) and disk_free_mib(cache_dir) < 2 * components_mib:
        return f"building the weights needs ~{2 * components_mib / 1024:.1f} GiB free disk under {cache_dir}"
    return None


def setups_for(args, device: torch.device) -> list[Setup]:
    chosen = ("tiny", "sd15_arch") if args.model == "both" else (args.model,)
    if args.quick and args.model == "both":  # a smoke run; the full-size model takes minutes and ~15 GB
        print("[train] --quick: tiny model only (--model sd15_arch to include the full size)", flush=True)
        chosen = ("tiny",)
    out = []
    precision = args.precision or ("16-mixed" if device.type == "cuda" else "32")
    if "tiny" in chosen:
        size, batch = (32, 4) if args.quick else (args.size, args.batch)
        steps, warmup = (3, 1) if args.quick else (args.steps, args.warmup)
        prepared = (setups.prepared_set(args.work_dir, size=size, n=16, height=256, width=208) if args.quick
                    else setups.prepared_set(args.work_dir, size=size, n=48))
        out.append(Setup("tiny", size, batch, warmup, steps, prepared, True, precision, args.num_workers))
    if "sd15_arch" in chosen:
        size = args.sd15_size
        prepared = setups.prepared_set(args.work_dir, size=size, n=12)
        out.append(Setup("sd15_arch", size, args.sd15_batch, 1, args.sd15_steps, prepared,
                         args.sd15_train_text_encoder, precision, args.num_workers))
    return out


def run(args) -> dict:
    device = resolve_device(args.device)
    facts = device_info(device)
    rows = []
    chosen = setups_for(args, device)
    for setup in chosen:
        variants = TINY_VARIANTS if setup.model == "tiny" else SD15_VARIANTS
        if args.variants:
            known = variants if setup.model == "tiny" else SD15_VARIANTS + SD15_EXTRA_VARIANTS
            variants = [v for v in known if v.name in args.variants]
        if setup.model == "sd15_arch" and device.type == "cpu" and (why := sd15_fits(setup, args.cache_dir)):
            print(f"sd15_arch skipped: {why}", flush=True)
            rows += [{"model": setup.model, "variant": v.name, "skipped": why} for v in variants]
            continue
        rounds = 1 if args.quick else args.sd15_rounds if setup.model == "sd15_arch" else args.rounds
        precheck = (functools.partial(sd15_fits, setup, args.cache_dir)
                    if setup.model == "sd15_arch" and device.type == "cpu" else lambda: None)
        rows += measure_setup(setup, variants, device, args.cache_dir, rounds, precheck,
                              isolate=setup.model == "sd15_arch")
    compare(rows)
    ratios = summary_ratios(rows)
    facts["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    table = format_table(rows, COLUMNS, title=f"Training throughput on {device_label(facts)}")
    config = {"setups": [{**{k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
                          "images": setups.text2image_count(s.prepared)} for s in chosen], "rounds": args.rounds, "sd15_rounds": args.sd15_rounds,
              "quick": args.quick}
    record_result(args, NAME, make_record(NAME, facts, config, rows, ratios))
    print(table)
    print(ratio_line(NAME, ratios), flush=True)
    return {"name": NAME, "rows": rows, "ratios": ratios, "table": table}


def parser() -> argparse.ArgumentParser:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--model", choices=("tiny", "sd15_arch", "both"), default="both")
    p.add_argument("--size", type=int, default=64, help="tiny model image side in pixels")
    p.add_argument("--batch", type=int, default=8, help="tiny model batch size")
    p.add_argument("--steps", type=int, default=8, help="timed steps per round (tiny)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per round (tiny)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of every tiny variant")
    p.add_argument("--sd15-size", type=int, default=256)
    p.add_argument("--sd15-batch", type=int, default=1)
    p.add_argument("--sd15-steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--sd15-rounds", type=int, default=2, help="interleaved rounds (each reloads the weights)")
    p.add_argument("--sd15-train-text-encoder", action="store_true",
                   help="also train the text encoder at full size (off: UNet only, diffusers' example default)")
    p.add_argument("--precision", choices=sorted(setups.PRECISIONS), default=None,
                   help="default: 32 on CPU, 16-mixed on CUDA")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers on both sides")
    p.add_argument("--variants", nargs="*", default=None, help="only these variant names")
    return p


def main(argv: list[str] | None = None) -> dict:
    return run(finish_args(parser().parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
