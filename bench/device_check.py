"""The GPU path at paper size in one short check (issue 14): stage-1 and stage-2 training
throughput, reconstruction speed, and two correctness checks, with random weights and
nothing downloaded. Written for one H200 in under 8 minutes, set-up included:

    PYTHONPATH=src python3 bench/device_check.py --out DIR            # the GPU machine (paper sizes)
    python bench/device_check.py --preset tiny --device cpu --out DIR  # seconds; tests/test_device_check.py

What it runs (bench/device_check_setup.py writes the inputs to a temporary folder):

* set-up: a random CLIP ViT-L/14 saved in the Hugging Face layout and loaded back through the
  real ``--vision`` path; a synthetic data folder in the MindEye2 layout (subject 1's 15,724
  voxels, random betas); random VQVAE-Switti (tokenizer ``paper`` preset) checkpoint;
* the bf16 matmul peak, measured in this run (the denominator of every MFU);
* stage 1: ``train-encoder``'s own Trainer and optimiser step on that folder (targets through
  the CLIP folder), paper HFE, per-GPU batch 64, bf16 autocast: steps/s and peak memory;
* correctness: cached sampling equals the teacher-forced logits within bf16 tolerance, and the
  same seed gives the same images at batch 1 and batch 8;
* reconstruction (Switti-d30 in bf16, as ``mindhier reconstruct`` runs it): s/image at batch 1
  (N = 1 and best-of-4) and images/s at batch 8 and 32, CFG at every scale and off for the last
  two, per component and per scale, MFU of the generator;
* stage 2: ``train-generator``'s own Trainer and optimiser step with random token pyramids,
  FSDP2 on a process group of one, per-GPU batch 10, bf16 autocast, activation checkpointing
  on, then off (micro batches growing until one runs out of memory): steps/s, peak memory, MFU.

Sections stop early, or are skipped, when ``--budget-s`` runs short; the results are rewritten
after every section (DIR/device_check.json, DIR/device_check.md), so a run cut off still
leaves what it measured. A section that fails records its error and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))   # run as a script or loaded by a test
import bench_generator as bg  # noqa: E402  (analytic FLOP counts, the matmul peak)
import device_check_report as report  # noqa: E402
import device_check_sampling as sampling  # noqa: E402
import device_check_setup as setup  # noqa: E402

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
SECTIONS = ("stage1", "correctness", "reconstruction", "stage2")
# Seconds a section needs at least; it is skipped when less of the budget is left.
NEED_S = {"paper": {"stage1": 45, "correctness": 30, "reconstruction": 60, "stage2": 90},
          "tiny": {"stage1": 1, "correctness": 1, "reconstruction": 1, "stage2": 1}}
RESERVE_S = {"paper": 15, "tiny": 0}    # kept back for writing the results and cleaning up


# ---------------------------------------------------------------------------------------------
# Time, memory, budget
# ---------------------------------------------------------------------------------------------

class Budget:
    def __init__(self, seconds: float, reserve: float):
        self.start, self.seconds, self.reserve = time.perf_counter(), seconds, reserve

    def used(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.used()

    def ok(self) -> bool:
        return self.left() > self.reserve


@dataclass
class Check:
    """Everything the sections share."""

    args: argparse.Namespace
    sizes: setup.Sizes
    device: torch.device
    work: Path
    budget: Budget
    results: dict
    peak_bf16: float | None = None
    stack: object = None            # the sampling stack, shared by correctness and reconstruction

    def path(self, name: str) -> Path:
        return self.work / name


def parse(add_arguments, argv: list[str]) -> argparse.Namespace:
    """A training command's own arguments, parsed by its own parser."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def timed_steps(check: Check, step, warmup: int | None = None, timed: int | None = None) -> dict:
    """Run ``step()`` (returns the loss) ``warmup`` times, then time ``timed`` steps (each
    synchronised), stopping early when the budget runs short."""
    s, dev = check.sizes, check.device
    warmup = s.warmup_steps if warmup is None else warmup
    timed = s.timed_steps if timed is None else timed
    setup.reset_peak(dev)
    losses = [float(step()) for _ in range(warmup)]
    times = []
    while len(times) < timed and check.budget.ok():
        t = setup.now(dev)
        losses.append(float(step()))
        times.append(setup.now(dev) - t)
    median = statistics.median(times) if times else None
    return {"step_s": times, "median_step_s": median, "steps_per_s": 1 / median if median else None,
            "peak_memory_gib": setup.peak_gib(dev), "losses": losses, "stopped_early": len(times) < timed}


# ---------------------------------------------------------------------------------------------
# Set-up and the machine's peak
# ---------------------------------------------------------------------------------------------

def prepare(check: Check) -> dict:
    """The CLIP folder, the data folder, a tokenizer checkpoint, a random encoder checkpoint
    (stage 1 replaces it with the encoder it trained)."""
    s, seconds = check.sizes, {}
    for name, write in (("clip", lambda: setup.write_clip_folder(check.path("clip-vit"), s.clip)),
                        ("data", lambda: setup.write_dataset(check.path("data"), s)),
                        ("tokenizer", lambda: setup.write_tokenizer(check.path("tokenizer/tokenizer"), s.tokenizer)),
                        ("encoder", lambda: setup.write_encoder(check.path("encoder/encoder"), s, check.path("clip-vit")))):
        t = time.perf_counter()
        write()
        seconds[name] = time.perf_counter() - t
    return seconds


def measure_peak(check: Check) -> float:
    seconds = 2.0 if check.args.preset == "paper" else 0.2
    return bg.matmul_peak(torch.bfloat16, check.sizes.matmul_n, check.device, seconds=seconds)


# ---------------------------------------------------------------------------------------------
# Stage 1: train-encoder's step
# ---------------------------------------------------------------------------------------------

def build_targets_on_device(check: Check, cache_dir: Path) -> None:
    """train-encoder builds its target cache with the vision model on the CPU (it loads it
    without a device); built here first on the device, under the same key and file name, the
    loop finds the cache and reuses it."""
    from mindhier.encoder.targets import layer_map
    from mindhier.vision import load_vision
    from mindhier.vision.targets import cached_targets

    vision = load_vision(check.path("clip-vit"), device=check.device).freeze()
    layers = layer_map("default", vision.num_layers, vision.default_layers)
    cached_targets(vision, check.path("data"), sorted(set(layers) | {vision.num_layers}), cache_dir,
                   with_text=True, show_progress=False)


def stage1(check: Check) -> dict:
    setup.ensure_tqdm()
    from mindhier.runtime import Dist
    from mindhier.train import common
    from mindhier.train import encoder as loop

    s, dev = check.sizes, check.device
    t = time.perf_counter()
    build_targets_on_device(check, check.path("targets"))
    targets_s = time.perf_counter() - t
    args = parse(loop.add_arguments, [
        "--data", str(check.path("data")), "--subject", "1", "--vision", str(check.path("clip-vit")),
        "--preset", s.encoder, "--out", str(check.path("stage1")), "--global-batch", str(s.stage1_batch),
        "--epochs", "1", "--target-cache", str(check.path("targets"))])
    t = time.perf_counter()
    trainer = loop.Trainer(args, Dist(rank=0, world_size=1, local_rank=0, device=dev))
    build_s = time.perf_counter() - t
    batches, guard = trainer._batches(0), {}

    def step():
        lr = common.warmup_cosine(trainer.step, trainer.total_steps, trainer.warmup_steps, args.lr)
        common.set_lr(trainer.optimizer, lr)
        k = trainer.step % (len(batches) // trainer.accum)
        parts, _ = trainer._optimizer_step(batches[k * trainer.accum:(k + 1) * trainer.accum], k, guard)
        trainer.step += 1
        return parts.get("loss", math.nan)

    out = timed_steps(check, step)
    setup.write_encoder(check.path("encoder/encoder"), s, check.path("clip-vit"), model=trainer.model,
                        layers=trainer.layers)
    return {**out, "voxels": trainer.num_voxels, "batch": s.stage1_batch,
            "params": sum(p.numel() for p in trainer.model.parameters()),
            "samples_per_s": s.stage1_batch * out["steps_per_s"] if out["steps_per_s"] else None,
            "precision": "bf16 autocast" if setup.bf16_is_fast(dev) else "fp32",
            "targets_s": targets_s, "build_s": build_s}


# ---------------------------------------------------------------------------------------------
# Stage 2: train-generator's step under FSDP2 on a process group of one
# ---------------------------------------------------------------------------------------------

def training_flops_per_sample(cfg) -> float:
    """Model FLOPs of one teacher-forced sample, forward + backward = 3 × forward (PaLM's MFU:
    recomputation under activation checkpointing is not counted, nor the frozen encoder). The
    forward is bench_generator's analytic count of one sequence (same-scale self-attention,
    routed cross-attention, the context's K/V once), less the AdaLN modulations that sampling
    computes at every scale and teacher forcing once. The loop itself runs dense masked
    attention over the whole pyramid, so the hardware does more than this."""
    K, C = cfg.num_scales, cfg.width
    adaln = cfg.depth * 2 * C * 6 * C + 2 * C * 2 * C
    forward = sum(bg.scale_flops(cfg, k, 1) for k in range(K)) - (K - 1) * adaln + bg.cache_flops(cfg, 1)
    return 3 * forward


def micro_batches(batch: int) -> list[int]:
    """Divisors of the per-GPU batch, ascending: without activation checkpointing the loop
    accumulates micro batches this size (``--max-micro-batch``) up to the same batch."""
    return [m for m in range(1, batch + 1) if batch % m == 0]


def stage2(check: Check) -> dict:
    setup.ensure_tqdm()
    import numpy as np
    import torch.distributed as dist

    from mindhier.runtime import Dist, process_group_backend
    from mindhier.train import common
    from mindhier.train import generator as loop
    from mindhier.train.distributed import split_global_batch

    class RandomTokens(loop.Trainer):
        """train-generator as it is, on random token pyramids instead of the tokenized stimuli."""

        def _token_table(self) -> dict:
            images = np.unique(self.train.image_indices)
            tokens = torch.randint(0, self.cfg.vocab_size, (len(images), self.cfg.seq_len), dtype=torch.int32,
                                   generator=torch.Generator().manual_seed(0))
            return {"rows": {int(i): r for r, i in enumerate(images)}, "tokens": tokens}

    @dataclass(frozen=True)
    class GroupOfOne(Dist):
        """Rank 0 of a process group of one: the multi-process code path (FSDP2) on one device."""

        @property
        def enabled(self) -> bool:
            return True

    s, dev = check.sizes, check.device
    dist.init_process_group(backend=process_group_backend(dev), init_method=check.path("process_group").as_uri(),
                            rank=0, world_size=1)
    try:
        args = parse(loop.add_arguments, [
            "--data", str(check.path("data")), "--subject", "1", "--encoder", str(check.path("encoder/encoder")),
            "--tokenizer", str(check.path("tokenizer/tokenizer")), "--preset", s.generator,
            "--out", str(check.path("stage2")), "--steps", "1000", "--global-batch", str(s.stage2_batch),
            "--warmup", "10", "--sample-every", "0", "--save-every", "0", "--parallel", "fsdp"])
        t = time.perf_counter()
        trainer = RandomTokens(args, GroupOfOne(rank=0, world_size=1, local_rank=0, device=dev))
        build_s, guard = time.perf_counter() - t, {}
        flops = training_flops_per_sample(trainer.cfg)

        def step():
            common.set_lr(trainer.optimizer, common.warmup_cosine(trainer.step, args.steps, args.warmup, args.lr))
            stats = trainer._optimizer_step(guard)
            trainer.step += 1
            return stats["loss"]

        def measure(checkpointing: bool, micro: int, warmup=None, timed=None) -> dict:
            trainer.model.checkpoint_activations = checkpointing
            trainer.micro, trainer.accum = split_global_batch(s.stage2_batch, 1, micro)
            row = {"activation_checkpointing": checkpointing, "global_batch": s.stage2_batch,
                   "micro_batch": trainer.micro, "accumulation": trainer.accum}
            try:
                out = timed_steps(check, step, warmup, timed)
            except OOM as err:
                trainer.optimizer.zero_grad(set_to_none=True)
                setup.free_memory()
                return {**row, "oom": True, "error": str(err)[:300], "peak_memory_gib": setup.peak_gib(dev)}
            rate = out["steps_per_s"]
            return {**row, **out, "oom": False, "samples_per_s": s.stage2_batch * rate if rate else None,
                    "mfu": flops * s.stage2_batch * rate / check.peak_bf16 if rate and check.peak_bf16 else None}

        runs = [measure(True, s.stage2_batch)]
        for micro in micro_batches(s.stage2_batch):
            if not check.budget.ok():
                break
            runs.append(measure(False, micro, warmup=1, timed=max(2, s.timed_steps // 2)))
            if runs[-1]["oom"]:
                break
        return {"params": trainer.model.num_params(), "parallel": "FSDP2 (fully_shard per block), 1 process",
                "backend": process_group_backend(dev), "train_flops_per_sample": flops, "build_s": build_s,
                "runs": runs}
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Running the sections; the results as files
# ---------------------------------------------------------------------------------------------

def environment(args, device: torch.device) -> dict:
    from mindhier.checkpoint import git_commit

    env = {"date": time.strftime("%Y-%m-%d %H:%M %z"), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
           "device_name": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "git_commit": args.commit or git_commit(), "preset": args.preset,
           "command": "python bench/device_check.py " + " ".join(args.argv)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, device_memory_gib=props.total_memory / 2**30,
                   cudnn=torch.backends.cudnn.version())
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    return env


def run_section(check: Check, name: str, fn) -> None:
    need = NEED_S[check.args.preset][name]
    if name not in check.args.sections:
        out = {"skipped": "not asked for (--sections)"}
    elif check.budget.left() - check.budget.reserve < need:
        out = {"skipped": f"budget: {check.budget.left():.0f} s left, the section needs about {need} s"}
    else:
        t = time.perf_counter()
        try:
            out = fn(check)
        except Exception as err:  # noqa: BLE001  a failed section is a result; the others still run
            out = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=-6)}
            print(out["traceback"], file=sys.stderr, flush=True)
        out["seconds"] = time.perf_counter() - t
    check.results["sections"][name] = out
    if name == "reconstruction" or (name == "correctness" and "reconstruction" not in check.args.sections):
        check.stack = None   # stage 2 needs the memory
    setup.free_memory()
    write_results(check)
    print(f"[device_check] {name}: {report.one_line(out)} ({check.budget.used():.0f} s used)", flush=True)


def write_results(check: Check) -> None:
    out = Path(check.args.out)
    out.mkdir(parents=True, exist_ok=True)
    check.results["used_s"] = check.budget.used()
    (out / "device_check.json").write_text(json.dumps(check.results, indent=1, default=float) + "\n")
    (out / "device_check.md").write_text(report.markdown(check.results))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for device_check.json and device_check.md")
    p.add_argument("--preset", default="paper", choices=sorted(setup.SIZES),
                   help="paper: the paper's sizes (a GPU); tiny: seconds on a CPU (the test)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget-s", type=float, default=450,
                   help="seconds for the whole run, set-up included; sections stop early or are skipped past it")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD, if a checkout)")
    p.add_argument("--work", default=None, help="temporary folder (default: a fresh one, removed at the end)")
    args = p.parse_args(argv)
    args.sections, args.argv = [x.strip() for x in args.sections.split(",") if x.strip()], list(argv)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    budget = Budget(args.budget_s, RESERVE_S[args.preset])
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="device_check_"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(args, device), "budget_s": args.budget_s, "sections": {}}
    check = Check(args, setup.SIZES[args.preset], device, work, budget, results)
    try:
        t = time.perf_counter()
        results["setup_s"] = prepare(check)
        results["setup_s"]["total"] = time.perf_counter() - t
        check.peak_bf16 = results["peak_bf16_flop_per_s"] = measure_peak(check)
        results["matmul_n"] = check.sizes.matmul_n
        print(f"[device_check] set-up {results['setup_s']['total']:.1f} s; bf16 matmul peak "
              f"{check.peak_bf16 / 1e12:.2f} TFLOP/s", flush=True)
        for name, fn in (("stage1", stage1), ("correctness", sampling.correctness),
                         ("reconstruction", sampling.reconstruction), ("stage2", stage2)):
            run_section(check, name, fn)
    except Exception as err:  # noqa: BLE001  set-up failed: record it, keep the file
        results["error"] = f"{type(err).__name__}: {err}"
        results["traceback"] = traceback.format_exc(limit=-6)
        raise
    finally:
        check.stack = None
        write_results(check)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    import os

    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)   # a gloo process group can abort at interpreter teardown (SPEC §7); results are written
