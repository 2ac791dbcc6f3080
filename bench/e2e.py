"""The whole reconstruction, timed per stage and per sampler step, on random weights built in memory.

The models have the architectures of ``amodal3r tiny-weights --size tiny|medium|full`` (full: the
official checkpoints' configurations) with seeded random weights, calibrated like the tiny folders
(a few percent of the 64^3 grid occupied, a surface through a few percent of the cubes); no file is
written but the results. The input is the shipped example (``examples/mug_behind_box``). One run
encodes, samples the structure, decodes the occupancy, samples the structured latent, decodes mesh
and Gaussians and exports the GLB (unwrap and bake at the default face count, 1024 px texture).

Printed and written as JSON (``--json``): seconds per stage (model building is ``load``, not part
of any stage), the median seconds of a guided (condition + unconditional) and of an unguided
sampler step per flow stage, peak RSS of this process, on CUDA also the peak allocated and reserved
memory, the device, dtype and thread count. On Linux also the peak RSS during each model's stage
without model building: with ``--plain memory_reuse`` (freed memory goes back to the system, so the
RSS follows the live tensors) and ``--low-vram`` this approximates what a device would need.
``--repeat N`` runs the reconstruction N times on the same loaded models and reports the median
of each figure over the runs after the first (all runs when N is 1).

``--flops`` adds one more reconstruction, untimed, under torch's FLOP counter (attention counted
apart), and measures this machine's peak matrix-product and attention rates at the run's dtype:
per stage it prints the GFLOP done, the rate achieved and the floor (those GFLOP at the peak
rates), the time no implementation doing the same arithmetic can beat on this machine. With
``--plain all`` the count is the plain algorithm's, the reference's.

``--sweep`` measures each exact shortcut apart, each run in a fresh process (one reconstruction
each), in rounds that alternate the modes: all on, all off (``--plain all``), then each shortcut
and ``memory_reuse`` off alone; ``--repeat N`` rounds. It prints the median seconds per stage of
each mode and its ratio to all on (above 1: turning that shortcut off costs time), with the load
average of the machine before and after (timings on a shared machine are only comparable paired).

    .venv/bin/python bench/e2e.py --size tiny|medium|full [--steps S] [--device D] [--dtype T]
        [--threads N] [--low-vram] [--repeat N] [--json PATH] [--seed 0] [--sweep] [--flops]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from amodal3r.io.inputs import load_view
from amodal3r.io.results import OutputSettings, write_results
from amodal3r.models import for_inference
from amodal3r.modules.matmul import attention, linear
from amodal3r.modules.shortcuts import NAMES, plain
from amodal3r.pipelines.amodal3r import IMAGE_ENCODER, Amodal3RPipeline, PipelineConfig, RunSettings, StageSettings
from amodal3r.pipelines.devices import configure_cpu, keep_freed_memory, pick_device
from amodal3r.pipelines.samplers import synchronize
from amodal3r.weights.layout import DECODER_MODELS
from amodal3r.weights.tiny import (
    SIZES,
    encoder_config,
    pipeline_config,
    random_image_encoder,
    random_model,
    tiny_configs,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mug_behind_box"
STAGES = ("encode", "structure", "occupancy", "slat", "decode_mesh", "decode_gaussian", "export")
MIB = 2**20
MEMORY_REUSE = "memory_reuse"  # not an exact shortcut: the process set-up of configure_cpu
STAGE_OF_MODEL = {
    IMAGE_ENCODER: "encode",
    "sparse_structure_flow_model": "structure",
    "sparse_structure_decoder": "occupancy",
    "slat_flow_model": "slat",
    **{model: f"decode_{kind}" for kind, model in DECODER_MODELS.items()},  # as the pipeline names them
}


def attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's counter knows the fused attention kernels of accelerators, not the CPU's flash kernel.
ATTENTION_OPS = {
    op: attention_flops
    for op in (
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
        torch.ops.aten._scaled_dot_product_flash_attention,
        torch.ops.aten._scaled_dot_product_efficient_attention,
        torch.ops.aten._scaled_dot_product_cudnn_attention,
    )
}


class RandomWeightsPipeline(Amodal3RPipeline):
    """The pipeline with every model built from its official-layout config with random weights."""

    def __init__(
        self,
        size: str,
        seed: int,
        device: torch.device,
        dtype: torch.dtype | None,
        low_vram: bool,
        compile: bool = False,
    ):
        self.size, self.seed = size, seed
        self.configs = tiny_configs(encoder_config(size).embed_dim, SIZES[size])
        models = {key: rel for key, (rel, _) in self.configs.items()}
        args = pipeline_config(models, torch.Generator().manual_seed(seed))["args"]
        folder = Path(f"<random {size} weights>")
        super().__init__(folder, PipelineConfig._parse(args), device, dtype, low_vram, compile)
        self.stage_rss: dict[str, float] = {}  # pipeline key -> peak RSS (MiB) while its stage ran
        self.flops: dict[str, dict[str, int]] | None = None  # stage -> {"matmul", "attention"} when counting
        self.baseline_rss = current_rss()

    def load(self, key: str) -> nn.Module:
        keys = [IMAGE_ENCODER, *self.configs]
        generator = torch.Generator().manual_seed(self.seed * len(keys) + keys.index(key))
        if key == IMAGE_ENCODER:
            return random_image_encoder(encoder_config(self.size), generator).to(self.device)
        config = self.configs[key][1]
        model = random_model(key, config, generator)
        return for_inference(model, bool(config["args"].get("use_fp16")), self.device, self.dtype)

    def sample_slat(self, cond: torch.Tensor, coords: torch.Tensor, *args, **kwargs):
        self.voxels = int(coords.shape[0])
        return super().sample_slat(cond, coords, *args, **kwargs)

    def model(self, key: str) -> nn.Module:
        """As the pipeline's, then the RSS high-water mark restarts: building random weights (fp32,
        with calibration runs) is no part of what a stage needs."""
        model = super().model(key)
        reset_peak_rss()
        return model

    @contextmanager
    def using(self, key: str) -> Iterator[nn.Module]:
        """As the pipeline's, recording the stage's peak RSS (weights on the CPU included)."""
        counter = FlopCounterMode(display=False, custom_mapping=ATTENTION_OPS) if self.flops is not None else None
        with super().using(key) as model, counter or nullcontext():
            try:
                yield model
            finally:
                peak = peak_rss_since_reset()
                if peak is not None:
                    self.stage_rss[key] = max(self.stage_rss.get(key, 0.0), peak)
        if counter is not None and self.flops is not None:
            add_flops(self.flops.setdefault(STAGE_OF_MODEL[key], {"matmul": 0, "attention": 0}), counter)


def add_flops(totals: dict[str, int], counter: FlopCounterMode) -> None:
    """Add a counter's FLOPs to a stage's totals, attention kernels apart from everything else."""
    for op, flops in counter.get_flop_counts()["Global"].items():
        totals["attention" if op in ATTENTION_OPS else "matmul"] += flops


def current_rss() -> float:
    """``VmRSS`` in MiB (Linux; 0 elsewhere)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0.0)


def reset_peak_rss() -> None:
    """Restart the kernel's RSS high-water mark (Linux ``clear_refs`` 5); elsewhere nothing."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_since_reset() -> float | None:
    """``VmHWM`` in MiB: the peak RSS since the last :func:`reset_peak_rss` (Linux only)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def peak_memory(device: torch.device, pipeline: RandomWeightsPipeline) -> dict[str, float]:
    """Peak memory in MiB: RSS of this process over the whole run (model building included; the
    unwrap's child is not counted), and per stage without building (a proxy for what a device
    needs: weights and activations, plus the process's own baseline); on CUDA the allocator's peaks."""
    usage = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    usage.update({f"peak_rss_during_{key}_mib": value for key, value in pipeline.stage_rss.items()})
    usage["baseline_rss_mib"] = pipeline.baseline_rss
    if device.type == "cuda":
        usage["peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / MIB
        usage["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / MIB
    elif device.type == "mps":
        usage["driver_allocated_mib"] = torch.mps.driver_allocated_memory() / MIB
    return usage


def step_medians(steps: list) -> dict[str, float | None]:
    """Median seconds of the guided (2+ passes) and unguided sampler steps of one stage."""
    guided = [s.seconds for s in steps if s.passes > 1]
    plain = [s.seconds for s in steps if s.passes == 1]
    return {
        "guided": statistics.median(guided) if guided else None,
        "unguided": statistics.median(plain) if plain else None,
    }


@contextmanager
def without(names: list[str]) -> Iterator[None]:
    """The named shortcuts off, and glibc's default memory hand-back if MEMORY_REUSE is named."""
    shortcuts = [n for n in names if n != MEMORY_REUSE]
    if MEMORY_REUSE in names:
        keep_freed_memory(False)
    try:
        with plain(*shortcuts) if shortcuts else nullcontext():
            yield
    finally:
        keep_freed_memory(True)


def one_run(pipeline: RandomWeightsPipeline, settings: RunSettings, out_dir: Path) -> dict:
    view = load_view(EXAMPLE / "image.png", EXAMPLE / "target_mask.png", EXAMPLE / "occluder_mask.png")
    cpu = time.process_time()
    result = pipeline([view], settings)
    start = time.perf_counter()
    written = write_results(result.meshes, result.gaussians, [out_dir / "e2e.glb"], OutputSettings(gaussians=True))
    report = written[0].report
    return {
        "seconds": dict(result.timings, export=time.perf_counter() - start),
        "cpu_seconds": time.process_time() - cpu,  # all threads: a steadier figure on a shared machine
        "steps": {stage: step_medians(steps) for stage, steps in result.steps.items()},
        "voxels": pipeline.voxels,
        "faces": report.faces_out,
        "export_seconds": report.seconds,
    }


def best_seconds(fn, device: torch.device, repeats: int = 5) -> float:
    """The fastest of a few calls after a warm-up: a ceiling rate wants the undisturbed figure."""
    fn()
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def peak_rates(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """GFLOP/s of a large matrix product and of attention (4,096 tokens, 4 heads of 64, the flows'
    head width) through the kernels the models use (the switches as set): the floor's ceilings."""
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    q = torch.randn(1, 4, 4096, 64, device=device, dtype=dtype)
    flops = sdpa_flop_count(q.shape, q.shape, q.shape)
    return {
        "matmul": 2 * 2048**3 / best_seconds(lambda: linear(a, a), device) / 1e9,
        "attention": flops / best_seconds(lambda: attention(q, q, q), device) / 1e9,
    }


def flop_rows(flops: dict[str, dict[str, int]], seconds: dict[str, float | None], peaks: dict[str, float]) -> dict:
    """Per stage (and in total) the GFLOP counted, the rate achieved and the floor at the peak rates."""
    rows = {}
    for stage, counted in [*flops.items(), ("total", {k: sum(f[k] for f in flops.values()) for k in peaks})]:
        giga = {kind: counted[kind] / 1e9 for kind in peaks}
        floor = sum(giga[kind] / peaks[kind] for kind in peaks)
        spent = sum(seconds.get(s) or 0.0 for s in flops) if stage == "total" else seconds.get(stage)
        rows[stage] = {
            **{f"{kind}_gflop": g for kind, g in giga.items()},
            "seconds": spent,
            "gflop_per_s": sum(giga.values()) / spent if spent else None,
            "floor_seconds": floor,
        }
    return rows


def print_flops(rows: dict, peaks: dict[str, float]) -> None:
    print(
        f"\nArithmetic counted in one more run (untimed); peak rates of this machine at this dtype: matrix "
        f"product {peaks['matmul']:.0f} GFLOP/s, attention {peaks['attention']:.0f} GFLOP/s. The floor is "
        "the counted GFLOP at those rates.\n"
    )
    print("| stage | matmul GFLOP | attention GFLOP | seconds | GFLOP/s | floor (s) | seconds / floor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for stage, r in rows.items():
        ratio = r["seconds"] / r["floor_seconds"] if r["seconds"] and r["floor_seconds"] else None
        cells = [r["matmul_gflop"], r["attention_gflop"], r["seconds"], r["gflop_per_s"], r["floor_seconds"]]
        print(f"| {stage} | " + " | ".join(_fmt(c) for c in cells) + f" | {_fmt(ratio)} |")


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(runs: list[dict]) -> dict:
    """Each figure's median over the runs after the first (which pays one-off costs); loading summed."""
    timed = runs[1:] or runs
    seconds = {k: _median([r["seconds"].get(k) for r in timed]) for k in STAGES}
    seconds["total"] = sum(v for v in seconds.values() if v is not None)
    seconds["load"] = sum(r["seconds"].get("load", 0.0) for r in runs)
    seconds["cpu (all threads)"] = _median([r["cpu_seconds"] for r in timed])
    steps = {
        stage: {kind: _median([r["steps"][stage][kind] for r in timed]) for kind in ("guided", "unguided")}
        for stage in runs[0]["steps"]
    }
    return dict(runs[-1], seconds=seconds, steps=steps, runs=len(runs))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _row(label: str, values: list[float | None]) -> str:
    cells = [_fmt(v) for v in values]
    if len(values) == 2:
        before, after = values
        cells.append(f"{before / after:.2f}x" if before and after else "-")
    return f"| {label} | " + " | ".join(cells) + " |"


def print_tables(summaries: list[dict], meta: dict, memory: dict[str, float]) -> None:
    """One column per summary; with two (before: shortcuts off, after: on), also their ratio."""
    last = summaries[-1]
    print(
        f"\n{meta['size']} weights, {meta['device']} ({meta['dtype']}), {meta['threads']} threads, "
        f"{meta['steps']} steps per stage, {last['voxels']} voxels, {last['faces']} faces exported; "
        f"median of {max(1, last['runs'] - 1)} run(s) each; shortcuts off: {', '.join(meta['plain']) or 'none'}"
        + (" (before) against all on (after), runs interleaved" if len(summaries) == 2 else "")
        + "\n"
    )
    columns = ["before (s)", "after (s)", "speed-up"] if len(summaries) == 2 else ["seconds"]
    print("| stage | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for stage in (*STAGES, "total", "load", "cpu (all threads)"):
        print(_row(stage, [s["seconds"].get(stage) for s in summaries]))
    print("\n| sampler step | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for stage in last["steps"]:
        for kind in ("guided", "unguided"):
            print(_row(f"{stage} {kind}", [s["steps"][stage][kind] for s in summaries]))
    print("\n| memory (whole process) | MiB |\n|---|---:|")
    for name, value in memory.items():
        print(f"| {name} | {value:.0f} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--steps", type=int, help="sampler steps of both stages (default: pipeline.json's 25)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="torso dtype (default: as loaded)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: one per physical core)")
    parser.add_argument("--low-vram", action="store_true", help="each model on the device only during its stage")
    parser.add_argument("--compile", action="store_true", help="torch.compile the structure flow and DINOv2")
    parser.add_argument("--repeat", type=int, default=1, help="runs on the same models; medians skip the first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--plain",
        default="",
        help=f"comma-separated exact shortcuts to turn off ({', '.join(NAMES)}), and/or {MEMORY_REUSE} "
        "(glibc hands freed memory back), or 'all': the before rows",
    )
    parser.add_argument(
        "--compare", action="store_true", help="alternate runs with --plain's shortcuts off and on; print both"
    )
    parser.add_argument(
        "--flops", action="store_true", help="count the arithmetic in one more run; print rates and floors"
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="each shortcut off alone, all off and all on, one fresh process per run, --repeat alternating rounds",
    )
    return parser.parse_args(argv)


SWEEP_ROWS = (*STAGES, "total", "cpu (all threads)")


def _load(average: tuple[float, ...] | None) -> str:
    return "-" if average is None else " ".join(f"{v:.2f}" for v in average)


def sweep(args: argparse.Namespace, argv: list[str]) -> None:
    """Alternating rounds of fresh processes: all on, all off, each shortcut off alone."""
    modes = ["", "all", *NAMES, MEMORY_REUSE]
    keep = []  # the child's options: ours less --sweep/--repeat/--json/--plain/--compare
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        name = arg.split("=")[0]
        if name in ("--sweep", "--compare"):
            continue
        if name in ("--repeat", "--json", "--plain"):
            skip_next = "=" not in arg
            continue
        keep.append(arg)
    seconds: dict[str, list[dict]] = {m: [] for m in modes}
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="amodal3r-sweep-") as tmp:
        for round_ in range(args.repeat):
            for mode in modes:
                out = Path(tmp) / "run.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), *keep, "--json", str(out)]
                if mode:
                    cmd += ["--plain", mode]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                run = json.loads(out.read_text())["runs"][0]["seconds"]
                seconds[mode].append(run)
                print(
                    f"round {round_ + 1}/{args.repeat}, off: {mode or 'none'}: total {run['total']:.2f} s", flush=True
                )
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    medians = {m: {k: _median([r.get(k) for r in runs]) for k in SWEEP_ROWS} for m, runs in seconds.items()}
    print(
        f"\n{args.size} weights, {args.steps or 'default'} steps, one fresh process per run, median of "
        f"{args.repeat} alternating round(s); load average before: {_load(load_before)}, after: {_load(load_after)}\n"
    )
    labels = ["all on", "all off", *(f"{m} off" for m in modes[2:])]
    print("| stage | " + " | ".join(labels) + " |\n|---|" + "---:|" * len(labels))
    for row in SWEEP_ROWS:
        print(f"| {row} | " + " | ".join(_fmt(medians[m][row]) for m in modes) + " |")
    base = medians[""]
    print("\n| ratio to all on | " + " | ".join(labels[1:]) + " |\n|---|" + "---:|" * (len(labels) - 1))
    for row in SWEEP_ROWS:
        cells = []
        for m in modes[1:]:
            value, ref = medians[m][row], base[row]
            cells.append(f"{value / ref:.2f}x" if value and ref else "-")
        print(f"| {row} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"argv": argv, "load_before": load_before, "load_after": load_after, "runs": seconds}
        args.json.write_text(json.dumps({**report, "medians": medians}, indent=2))


def count_flops(
    pipeline: RandomWeightsPipeline, settings: RunSettings, off: list[str], seconds: dict, dtype: torch.dtype
) -> dict:
    """One more reconstruction under the FLOP counter, and the floors at this machine's peak rates."""
    pipeline.flops = {}
    # torch's counter knows aten's products, not oneDNN's: count on aten's, the same arithmetic.
    with tempfile.TemporaryDirectory(prefix="amodal3r-e2e-") as out, without([*off, "onednn_matmul"]):
        one_run(pipeline, settings, Path(out))
    with without(off):
        peaks = peak_rates(pipeline.device, dtype)
    rows = flop_rows(pipeline.flops, seconds, peaks)
    print_flops(rows, peaks)
    return {"peaks_gflop_per_s": peaks, "stages": rows}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.sweep:
        sweep(args, sys.argv[1:] if argv is None else argv)
        return
    configure_cpu(args.threads)
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    pipeline = RandomWeightsPipeline(args.size, args.seed, device, dtype, args.low_vram, args.compile)
    stage = StageSettings(steps=args.steps)
    settings = RunSettings(seed=args.seed, structure=stage, slat=stage)
    names = [] if not args.plain else [*NAMES, MEMORY_REUSE] if args.plain == "all" else args.plain.split(",")
    modes = [names, []] if args.compare else [names]
    runs: list[list[dict]] = [[] for _ in modes]
    with tempfile.TemporaryDirectory(prefix="amodal3r-e2e-") as out:
        for i in range(args.repeat):
            for mode, off in enumerate(modes):
                with without(off):
                    runs[mode].append(one_run(pipeline, settings, Path(out)))
                times = ", ".join(f"{k} {v:.2f}" for k, v in runs[mode][-1]["seconds"].items())
                print(f"run {i + 1}/{args.repeat}, shortcuts off: {', '.join(off) or 'none'}: {times}", flush=True)
    meta = {
        "size": args.size,
        "device": str(device),
        "dtype": args.dtype or "default",
        "threads": torch.get_num_threads(),
        "steps": args.steps or pipeline.config.structure_sampler.steps,
        "low_vram": args.low_vram,
        "compile": args.compile,
        "plain": names,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "argv": sys.argv[1:],
    }
    summaries = [summarise(r) for r in runs]
    memory = peak_memory(device, pipeline)
    print_tables(summaries, meta, memory)
    report = {"meta": meta, "memory": memory, "runs": summaries}
    if args.flops:
        report["flops"] = count_flops(pipeline, settings, names, summaries[0]["seconds"], dtype or torch.float32)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
