"""The ``amodal3r`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from amodal3r.api.errors import Amodal3RError
from amodal3r.api.protocol import MAX_UPLOAD_BYTES, MULTIVIEW_MODES, SAM_KINDS
from amodal3r.weights.layout import HF_REPO

DTYPES = ("float32", "float16", "bfloat16")


def _tiny_weights(args: argparse.Namespace) -> int:
    from amodal3r.weights.tiny import write_tiny_weights

    out = write_tiny_weights(args.out_dir, seed=args.seed, size=args.size)
    print(f"wrote {args.size} RANDOM weights (for tests, demos and benchmarks, not a real model) to {out}")
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


def _pipeline(args: argparse.Namespace, folder: Path):
    """The pipeline for ``reconstruct`` and ``slat``, with the CPU set up (threads, memory reuse)."""
    import torch

    from amodal3r.pipelines.amodal3r import Amodal3RPipeline
    from amodal3r.pipelines.devices import configure_cpu

    configure_cpu(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return Amodal3RPipeline.from_pretrained(
        folder, device=args.device, dtype=dtype, low_vram=args.low_vram, compile=args.compile == "on"
    )


def _slat(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    pipeline = _pipeline(args, args.model)
    if pipeline.config.tiny_random_weights:
        print(f"NOTE: {args.model} holds tiny RANDOM weights (amodal3r tiny-weights), not the Amodal3R model")
    cond = _load_cond(args, pipeline.model("sparse_structure_flow_model").cond_channels)
    progress = _progress_printer()
    started = progress.started
    t0 = time.perf_counter()
    slat = pipeline.sample_latent(cond, _run_settings(args, formats=()), progress=progress)
    total = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"coords": slat.coords.cpu(), "feats": slat.feats.float().cpu().contiguous()}, str(args.out))
    print(f"{slat.feats.shape[0]} voxels in {slat.batch_size} variant(s) -> {args.out}")
    print(
        f"time: structure {started['slat'] - t0:.2f} s (incl. loading and occupancy decoding), "
        f"latent {t0 + total - started['slat']:.2f} s, total {total:.2f} s on {pipeline.device}"
    )
    return 0


class ViewArgument(argparse.Action):
    """``--image`` opens a view; the mask options that follow it belong to that view."""

    def __call__(self, parser, namespace, value, option_string=None):
        views = getattr(namespace, "views", None) or []
        key = self.dest
        if key == "image":
            views.append({"image": value})
        elif not views:
            parser.error(f"{option_string} must follow the --image it belongs to")
        elif key in views[-1]:
            parser.error(f"{option_string} given twice for {views[-1]['image']}")
        else:
            views[-1][key] = value
        namespace.views = views


def _run_settings(args: argparse.Namespace, formats: tuple[str, ...]):
    """``--steps`` and ``--cfg`` set both stages; unset, each keeps pipeline.json's value."""
    from amodal3r.pipelines.amodal3r import RunSettings, StageSettings

    stage = StageSettings(steps=args.steps, cfg_strength=args.cfg)
    return RunSettings(
        seed=args.seed, variants=args.variants, multiview=args.multiview, structure=stage, slat=stage, formats=formats
    )


def _reconstruct(args: argparse.Namespace) -> int:
    from amodal3r.io.inputs import load_view
    from amodal3r.io.results import OutputSettings, write_results
    from amodal3r.weights.hub import resolve_model

    views = [load_view(v["image"], v.get("target_mask"), v.get("occluder_mask"), v.get("mask")) for v in args.views]
    for view in views:
        for notice in view.notices:
            print(f"notice: {notice}")
    folder = resolve_model(args.model)
    pipeline = _pipeline(args, folder)
    if pipeline.config.tiny_random_weights:
        print(
            f"NOTE: {folder} holds tiny RANDOM weights (amodal3r tiny-weights): the result is noise, "
            "not a reconstruction. Pass --model with the Amodal3R weights for real results"
        )
    formats = ("mesh", "gaussian") if args.gaussians else ("mesh",)
    result = pipeline(views, _run_settings(args, formats), progress=_progress_printer())
    outputs = OutputSettings(
        texture_size=args.texture_size, faces=args.faces, gaussians=args.gaussians, preview=args.preview
    )
    for written in write_results(
        result.meshes, result.gaussians, _variant_paths(args.out, len(result.meshes)), outputs
    ):
        for notice in written.report.notices:
            print(f"notice: {notice}")
        report = written.report
        print(
            f"wrote {written.glb} ({report.faces_out} faces, {report.texture_size}px texture, "
            f"{report.seconds_total:.1f} s to export)"
        )
        for extra in written.extras:
            print(f"wrote {extra}")
    times = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
    print(f"time: {times} on {pipeline.device}; views in order: {', '.join(result.views)}")
    return 0


def _variant_paths(out: Path, n: int) -> list[Path]:
    """``out.glb`` for one variant, ``out_0.glb``, ``out_1.glb``... for several."""
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


def _progress_printer():
    started: dict[str, float] = {}

    def progress(stage: str, step: int, total: int) -> None:
        started.setdefault(stage, time.perf_counter())
        if sys.stdout.isatty():
            print(f"\r{stage:>9} {step:3d}/{total}", end="\n" if step == total else "", flush=True)
        else:
            print(f"{stage:>9} {step:3d}/{total}", flush=True)

    progress.started = started  # type: ignore[attr-defined]
    return progress


def default_data_dir() -> Path:
    """Where a server keeps its jobs when no --data-dir is given: the platform's user data folder."""
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home())) / "amodal3r"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "amodal3r"
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "amodal3r"


def _sam_checkpoint(text: str) -> tuple[str, Path]:
    kind, sep, path = text.partition("=")
    if not sep or kind not in SAM_KINDS:
        raise argparse.ArgumentTypeError(f"expected KIND=PATH with KIND one of {', '.join(SAM_KINDS)}, got {text!r}")
    return kind, Path(path)


def _serve(args: argparse.Namespace) -> int:
    from amodal3r.pipelines.devices import configure_cpu
    from amodal3r.service.app import ServerConfig, serve

    configure_cpu(args.threads)
    return serve(
        ServerConfig(
            model_dir=args.model,
            data_dir=args.data_dir,
            host=args.host,
            port=args.port,
            device=args.device,
            dtype=args.dtype,
            idle_unload=args.idle_unload,
            sam_checkpoints=dict(args.sam_checkpoint),
            max_upload_bytes=int(args.max_upload_mb * 2**20),
        )
    )


def _speed_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, help="CPU threads (default: one per physical core)")
    parser.add_argument(
        "--low-vram",
        action="store_true",
        help="each model on the GPU only while its stage runs (on the CPU: freed after its stage)",
    )
    parser.add_argument(
        "--compile",
        choices=("on", "off"),
        default="off",
        help="torch.compile the structure flow and DINOv2 (off: no gain measured on CPUs, 16-22 s to compile)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amodal3r", description="Amodal3R occluded-object reconstruction")
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny-weights", help="write a tiny random model folder in the official layout")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--size",
        choices=("tiny", "medium", "full"),
        default="tiny",
        help="medium: 256-channel flows, 512-channel decoders, the full-size DINOv2; "
        "full: the official checkpoints' architectures (several GB)",
    )
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
    slat.add_argument("--multiview", choices=MULTIVIEW_MODES, default="stochastic")
    slat.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    slat.add_argument("--dtype", choices=DTYPES, help="compute dtype (default: fp16 checkpoints in fp16 on GPUs)")
    _speed_options(slat)
    slat.set_defaults(run=_slat)

    rec = commands.add_parser(
        "reconstruct",
        help="photos with masks -> a textured GLB",
        description="Each --image takes the mask options that follow it.",
    )
    rec.add_argument("--image", action=ViewArgument, required=True, type=Path, help="an image of the object")
    rec.add_argument("--target-mask", action=ViewArgument, type=Path, help="visible part of the target (white)")
    rec.add_argument("--occluder-mask", action=ViewArgument, type=Path, help="occluders in front of it (white)")
    rec.add_argument(
        "--mask",
        action=ViewArgument,
        type=Path,
        help="one mask: grey format (255 background, 188 target, 0 occluder) or labels 0/1/2",
    )
    rec.add_argument("--model", default=HF_REPO, help="model folder or Hugging Face id (default: %(default)s)")
    rec.add_argument("--out", type=Path, required=True, help="output .glb (variants get _0, _1, ...)")
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--steps", type=int, help="sampler steps of both stages (default: pipeline.json)")
    rec.add_argument("--cfg", type=float, help="guidance strength of both stages (default: pipeline.json)")
    rec.add_argument("--variants", type=int, default=1)
    rec.add_argument("--multiview", choices=MULTIVIEW_MODES, default="stochastic")
    rec.add_argument("--texture-size", type=int, default=1024)
    rec.add_argument("--faces", type=int, help="decimate to about this many faces before unwrapping")
    rec.add_argument("--gaussians", action="store_true", help="also write the 3D Gaussians as .ply")
    rec.add_argument("--preview", action="store_true", help="also write a front-view preview .png")
    rec.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    rec.add_argument("--dtype", choices=DTYPES)
    _speed_options(rec)
    rec.set_defaults(run=_reconstruct)

    srv = commands.add_parser("serve", help="run the reconstruction server (HTTP, for the Blender extension)")
    srv.add_argument("--model", type=Path, required=True, help="model folder (pipeline.json, checkpoints, sam/)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    srv.add_argument("--port", type=int, default=0, help="0 picks a free port (printed and in server.json)")
    srv.add_argument(
        "--data-dir", type=Path, default=default_data_dir(), help="jobs, uploads and results (default: %(default)s)"
    )
    srv.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    srv.add_argument("--dtype", choices=DTYPES)
    srv.add_argument("--idle-unload", type=float, default=900.0, help="unload models after this many idle seconds")
    srv.add_argument("--threads", type=int, help="CPU threads (default: one per physical core)")
    srv.add_argument(
        "--sam-checkpoint",
        type=_sam_checkpoint,
        action="append",
        default=[],
        metavar="KIND=PATH",
        help="a SAM checkpoint outside the model folder (repeatable)",
    )
    srv.add_argument(
        "--max-upload-mb",
        type=float,
        default=MAX_UPLOAD_BYTES / 2**20,
        help="largest request body accepted (default: %(default)s)",
    )
    srv.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (Amodal3RError, ValueError, OSError) as e:
        print(f"amodal3r: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
