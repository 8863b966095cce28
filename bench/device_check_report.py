"""bench/device_check.py's results as markdown: the tables DIR/device_check.md holds, written
from the same dictionary as DIR/device_check.json (so the two cannot disagree)."""

from __future__ import annotations


def _f(x, digits: int = 3, scale: float = 1.0) -> str:
    return "–" if x is None else f"{x * scale:.{digits}f}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def one_line(section: dict) -> str:
    """A section's outcome in a few words (printed as the run goes)."""
    if "skipped" in section:
        return "skipped (" + section["skipped"] + ")"
    if "error" in section:
        return "FAILED: " + section["error"]
    return f"done in {section.get('seconds', 0):.1f} s"


def _cfg(off) -> str:
    return "every scale" if off is None else f"off from scale {off + 1}"


def _status(lines: list[str], section: dict) -> bool:
    """Say why a section has no figures; True when it has."""
    if "skipped" in section:
        lines += [f"Skipped: {section['skipped']}.", ""]
        return False
    if "error" in section:
        lines += ["Failed:", "", "```", section.get("traceback", section["error"]).rstrip(), "```", ""]
        return False
    return True


def _stage1(lines: list[str], r: dict) -> None:
    lines += ["## Stage 1: the HFE, train-encoder's optimiser step", ""]
    if not _status(lines, r):
        return
    lines += [f"{r['params'] / 1e6:.0f} M parameters, {r['voxels']} voxels, {r['precision']}; target cache built on "
              f"the device in {r['targets_s']:.1f} s, trainer built in {r['build_s']:.1f} s.", "",
              "| batch | steps timed | s / step (median) | steps / s | samples / s | peak GiB | losses |",
              "|---|---|---|---|---|---|---|",
              f"| {r['batch']} | {len(r['step_s'])} | {_f(r['median_step_s'])} | {_f(r['steps_per_s'], 2)} | "
              f"{_f(r['samples_per_s'], 1)} | {_f(r['peak_memory_gib'], 1)} | "
              + " ".join(f"{x:.3f}" for x in r["losses"]) + " |", ""]


def _stage2(lines: list[str], r: dict) -> None:
    lines += ["## Stage 2: the generator, train-generator's optimiser step", ""]
    if not _status(lines, r):
        return
    lines += [f"{r['params'] / 1e9:.2f} B parameters, {r['parallel']}, backend {r['backend']}, bf16 autocast, "
              f"random token pyramids; trainer built in {r['build_s']:.1f} s. MFU counts "
              f"{r['train_flops_per_sample'] / 1e12:.1f} TFLOP per sample (3 × the useful forward; the loop's "
              "dense masked attention and any recomputation are not counted).", "",
              "| activation checkpointing | global batch | micro × accum | steps timed | s / step | samples / s | "
              "peak GiB | MFU % |", "|---|---|---|---|---|---|---|---|"]
    for run in r["runs"]:
        ac = "on" if run["activation_checkpointing"] else "off"
        head = f"| {ac} | {run['global_batch']} | {run['micro_batch']} × {run['accumulation']} |"
        if run.get("oom"):
            lines.append(f"{head} out of memory | – | – | {_f(run.get('peak_memory_gib'), 1)} | – |")
        else:
            lines.append(f"{head} {len(run['step_s'])} | {_f(run['median_step_s'])} | {_f(run['samples_per_s'], 2)} | "
                         f"{_f(run['peak_memory_gib'], 1)} | {_pct(run['mfu'])} |")
    lines.append("")


def _reconstruction(lines: list[str], r: dict) -> None:
    lines += ["## Reconstruction: sampling.reconstruct, generator in " + r.get("dtype", "?"), ""]
    if not _status(lines, r):
        return
    lines += ["Seconds are for the whole batch except s / image; MFU is the generator's (K/V cache and scales) "
              "against the bf16 peak above.", "",
              "| batch | N | CFG | s / image | images / s | encoder | K/V cache | scales | decode | rank | "
              "generator TFLOP/s | MFU % |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in r["runs"]:
        t = run["seconds"]
        lines.append(f"| {run['batch']} | {run['candidates']} | {_cfg(run['cfg_off_from'])} | "
                     f"{_f(run['seconds_per_image'])} | {_f(run['images_per_s'], 2)} | {_f(t['encoder'])} | "
                     f"{_f(t['kv_cache'])} | {_f(t['generator'] - t['kv_cache'])} | {_f(t['decode'])} | "
                     f"{_f(t['rank'])} | {_f(run['generator_flop_per_s'], 1, 1e-12)} | {_pct(run['mfu'])} |")
    lines += ["", "| batch | N | CFG | seconds per scale | MFU % per scale |", "|---|---|---|---|---|"]
    for run in r["runs"]:
        mfu = " ".join(_pct(x) for x in run["scale_mfu"]) if run["scale_mfu"] else "–"
        lines.append(f"| {run['batch']} | {run['candidates']} | {_cfg(run['cfg_off_from'])} | "
                     + " ".join(f"{x:.4f}" for x in run["seconds"]["scales"]) + f" | {mfu} |")
    if r.get("skipped_for_budget"):
        lines.append(f"\nNot run (budget): {r['skipped_for_budget']}")
    lines.append("")


def _correctness(lines: list[str], r: dict) -> None:
    lines += ["## Correctness", ""]
    if not _status(lines, r):
        return
    c, b = r["cached_vs_teacher_forced"], r["batch_invariance"]
    lines += ["| check | passed | figures |", "|---|---|---|",
              f"| cached sampling = teacher-forced logits ({c['dtype']}, batch {c['batch']}) | "
              f"{'yes' if c['passed'] else '**no**'} | relative RMS difference {c['rms_relative']:.2e} "
              f"(tolerance {c['tolerance']:.0e}; per scale " + " ".join(f"{x:.1e}" for x in c["rms_relative_per_scale"])
              + f"), largest difference {c['max_abs_diff']:.3g} for logits up to {c['max_abs_logit']:.3g}, "
              f"argmax agreement {100 * c['argmax_agreement']:.2f} % |",
              _same_row(f"same seed, batch 1 = batch {b['batch']}, end to end", b["end_to_end"])
              + f"; the encoder's levels differ by up to {b['encoder_max_abs_diff']:.3g} |",
              _same_row(f"same seed, batch 1 = batch {b['batch']}, given the same conditions",
                        b["given_conditions"]) + " |", ""]


def _same_row(what: str, r: dict) -> str:
    return (f"| {what} | {'yes' if r['passed'] else '**no**'} | {r['images_identical']} of {r['images']} images "
            f"identical, {100 * r['token_agreement']:.2f} % of tokens equal, max pixel difference "
            f"{r['max_abs_pixel_diff']:.3g}")


def markdown(results: dict) -> str:
    env, sections = results["environment"], results.get("sections", {})
    setup_s = results.get("setup_s", {})
    peak = results.get("peak_bf16_flop_per_s")
    lines = ["# Device check", "",
             f"Written by `bench/device_check.py` on {env['date']} (git {str(env['git_commit'])[:12]}): preset "
             f"{env['preset']}, device {env['device_name']} ({env['device']}), torch {env['torch']}, CUDA "
             f"{env['cuda']}, transformers {env['transformers']}, Python {env['python']}.", "",
             "```bash", env["command"], "```", "",
             f"Set-up {_f(setup_s.get('total'), 1)} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in setup_s.items()
                                                                 if k != "total") + "); "
             f"bf16 matmul peak ({results.get('matmul_n')}³) {_f(peak, 1, 1e-12)} TFLOP/s; "
             f"{_f(results.get('used_s'), 0)} s of the {results['budget_s']:.0f} s budget used.", ""]
    if "error" in results:
        lines += ["Set-up failed:", "", "```", results.get("traceback", results["error"]).rstrip(), "```", ""]
    for name, write in (("stage1", _stage1), ("correctness", _correctness), ("reconstruction", _reconstruction),
                        ("stage2", _stage2)):
        if name in sections:
            write(lines, sections[name])
    return "\n".join(lines) + "\n"
