"""The SAM image encoder (the cost of the first click on an image): segment-anything's attention
against ours with the relative-position bias folded into SDPA, then with oneDNN's products. Each
variant runs in its own process so that its peak memory is its own. Random weights: the cost does
not depend on them.

    .venv/bin/python bench/sam_encoder.py [--kinds vit_b vit_l vit_h] [--threads 2] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = ("segment-anything", "folded bias", "folded bias, oneDNN (ours)")


def measure(kind: str, variant: str, threads: int, runs: int) -> dict:
    """Runs in the child process: build, encode ``runs`` times, report the best time and peak RSS."""
    import torch

    from amodal3r.modules.matmul import route_linears
    from amodal3r.modules.shortcuts import SHORTCUTS
    from amodal3r.pipelines.segment import build_sam, fold_attention_bias

    torch.set_num_threads(threads)
    model = build_sam(kind).eval()
    if variant != VARIANTS[0]:
        fold_attention_bias(model)
    SHORTCUTS.onednn_matmul = variant == VARIANTS[2]
    route_linears(model)
    image = torch.randn(1, 3, 1024, 1024)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    with torch.inference_mode():
        for _ in range(runs):
            start = time.perf_counter()
            model.image_encoder(image)
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": min(times), "extra_peak_mib": (peak - before) / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["vit_b"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.threads, args.runs)))
        return 0
    print(f"SAM image encoder, 1024x1024, CPU, {args.threads} threads, best of {args.runs}\n")
    print("| model | attention                   | encode (s) | peak memory during encode (MiB) |")
    print("|-------|-----------------------------|------------|---------------------------------|")
    for kind in args.kinds:
        for variant in VARIANTS:
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--threads",
                    str(args.threads),
                    "--runs",
                    str(args.runs),
                    "--child",
                    kind,
                    variant,
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            row = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"| {kind:<5} | {variant:<27} | {row['seconds']:10.2f} | {row['extra_peak_mib']:31.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
