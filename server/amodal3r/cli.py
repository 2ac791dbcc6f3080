"""The ``amodal3r`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DTYPES = ("float32", "float16", "bfloat16")


def _tiny_weights(args: argparse.Namespace) -> int:
    from .tiny_weights import write_tiny_weights

    out = write_tiny_weights(args.out_dir, seed=args.seed)
    print(f"wrote tiny RANDOM weights (for tests and demos, not a real model) to {out}")
    return 0


def _load_cond(args: argparse.Namespace, width: int):
    import torch
    from safetensors.torch import load_file

    if args.cond is not None:
        tensors = load_file(str(args.cond))
        if "cond" not in tensors:
            raise SystemExit(f"{args.cond}: expected a tensor named 'cond' [views, 4112, C]")
        return tensors["cond"]
    print("NOTE: conditioning on RANDOM tokens and masks (--random-cond): the result shows speed, not shape")
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.nn.functional.layer_norm(torch.randn(1, 1374, width, generator=g), (width,))
    vis = (torch.rand(1, 1369, 1, generator=g) * 196).round() / 196
    return torch.cat([tokens, vis.expand(-1, -1, width), (1 - vis).expand(-1, -1, width)], dim=1)


def _slat(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from .pipeline import Amodal3RPipeline

    pipeline = Amodal3RPipeline.from_pretrained(args.model, device=args.device,
                                                dtype=getattr(torch, args.dtype) if args.dtype else None)
    if pipeline.config.tiny_random_weights:
        print(f"NOTE: {args.model} holds tiny RANDOM weights (amodal3r tiny-weights), not the Amodal3R model")
    cond = _load_cond(args, pipeline.model("sparse_structure_flow_model").cond_channels)
    started: dict[str, float] = {}

    def progress(stage: str, step: int, total: int) -> None:
        started.setdefault(stage, time.perf_counter())
        if sys.stdout.isatty():
            print(f"\r{stage:>9} {step:3d}/{total}", end="\n" if step == total else "", flush=True)
        else:
            print(f"{stage:>9} {step:3d}/{total}", flush=True)

    t0 = time.perf_counter()
    params = {"steps": args.steps, "cfg_strength": args.cfg}
    slat = pipeline.run(cond, seed=args.seed, variants=args.variants, multiview=args.multiview,
                        structure_params=params, slat_params=params, progress=progress)
    total = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"coords": slat.coords.cpu(), "feats": slat.feats.float().cpu().contiguous()}, str(args.out))
    print(f"{slat.feats.shape[0]} voxels in {slat.batch_size} variant(s) -> {args.out}")
    print(f"time: structure {started['slat'] - t0:.2f} s (incl. loading and occupancy decoding), "
          f"latent {t0 + total - started['slat']:.2f} s, total {total:.2f} s on {pipeline.device}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amodal3r", description="Amodal3R occluded-object reconstruction")
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny-weights", help="write a tiny random model folder in the official layout")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_tiny_weights)

    slat = commands.add_parser("slat", help="sample the structured latent from a conditioning tensor")
    slat.add_argument("--model", type=Path, required=True, help="model folder with pipeline.json")
    source = slat.add_mutually_exclusive_group(required=True)
    source.add_argument("--cond", type=Path, help="safetensors file with 'cond' [views, 4112, C]")
    source.add_argument("--random-cond", action="store_true", help="random tokens and masks (speed checks)")
    slat.add_argument("--out", type=Path, required=True)
    slat.add_argument("--seed", type=int, default=0)
    slat.add_argument("--steps", type=int, help="sampler steps of both stages (default: pipeline.json)")
    slat.add_argument("--cfg", type=float, help="guidance strength of both stages (default: pipeline.json)")
    slat.add_argument("--variants", type=int, default=1)
    slat.add_argument("--multiview", choices=("stochastic", "multidiffusion"), default="stochastic")
    slat.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    slat.add_argument("--dtype", choices=DTYPES, help="compute dtype (default: fp16 checkpoints in fp16 on GPUs)")
    slat.set_defaults(run=_slat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear line and a non-zero exit
        from .checkpoints import CheckpointError
        from .pipeline import PipelineError

        if isinstance(e, (CheckpointError, PipelineError, ValueError, OSError)):
            print(f"amodal3r: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
