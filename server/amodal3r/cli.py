"""The ``amodal3r`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from amodal3r.api.errors import Amodal3RError, InputError, ProtocolError
from amodal3r.api.protocol import (
    BODY_IDLE_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    MAX_UPLOAD_BYTES,
    MULTIVIEW_MODES,
    SAM_KINDS,
    JobParams,
    check_setting,
)
from amodal3r.weights.layout import HF_REPO, RANDOM_WEIGHTS_NOTICE

DTYPES = ("float32", "float16", "bfloat16")
KIND_NAMES = {int: "an integer", float: "a number"}


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


def _pipeline(args: argparse.Namespace, folder: Path, device=None):
    """The pipeline for ``reconstruct`` and ``slat``, with the CPU set up (threads, memory reuse)."""
    import torch

    from amodal3r.pipelines.amodal3r import Amodal3RPipeline
    from amodal3r.pipelines.devices import configure_cpu

    configure_cpu(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return Amodal3RPipeline.from_pretrained(
        folder, device=device or args.device, dtype=dtype, low_vram=args.low_vram, compile=args.compile == "on"
    )


def _slat(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    pipeline = _pipeline(args, args.model)
    if pipeline.config.tiny_random_weights:
        print(f"{RANDOM_WEIGHTS_NOTICE} ({args.model})")
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


def _check_output(out: Path, suffix: str = ".glb", what: str = "a binary glTF") -> None:
    """Refuse an output the run could not write, before any model loads."""
    if out.suffix.lower() != suffix:
        raise InputError(f"--out {out}: the result is {what}, so the name must end in {suffix}")
    folder = out.parent.absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # nothing is created before the run
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(
            f"--out {out}: cannot write into {folder} ({existing} is not a writable folder); choose another"
        )


def _place_params(args: argparse.Namespace):
    """``--camera`` (a camera.json) or ``--fov`` as the protocol's placement settings."""
    from amodal3r.api.camera import Intrinsics
    from amodal3r.api.protocol import PlaceParams

    camera = Intrinsics.from_json(args.camera).to_dict() if args.camera is not None else None
    return PlaceParams(camera, args.fov).validate()


def _place(args: argparse.Namespace) -> int:
    from amodal3r.io.camera import photo_camera
    from amodal3r.io.inputs import load_view
    from amodal3r.pipelines.placement import fit_glb

    _check_output(args.out, ".json", "a pose.json")
    view = load_view(args.image, args.target_mask, args.occluder_mask, args.mask)
    pose = fit_glb(args.mesh, view, photo_camera(args.image, _place_params(args)))
    pose.write(args.out)
    print(f"wrote {args.out} (silhouette score {pose.score:.3f}, {len(pose.candidates)} other candidates)")
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    from amodal3r.io.camera import photo_camera
    from amodal3r.io.inputs import load_view
    from amodal3r.io.results import OutputSettings, write_results
    from amodal3r.pipelines.devices import pick_device
    from amodal3r.pipelines.placement import place_variants
    from amodal3r.weights.hub import resolve_model

    _check_output(args.out)
    device = pick_device(args.device)
    views = [load_view(v["image"], v.get("target_mask"), v.get("occluder_mask"), v.get("mask")) for v in args.views]
    camera = photo_camera(args.views[0]["image"], _place_params(args)) if args.place else None
    for view in views:
        for notice in view.notices:
            print(f"notice: {notice}")
    folder = resolve_model(args.model)
    pipeline = _pipeline(args, folder, device)
    formats = ("mesh", "gaussian") if args.gaussians else ("mesh",)
    result = pipeline(views, _run_settings(args, formats), progress=_progress_printer())
    outputs = OutputSettings(args.texture_size, args.faces, args.gaussians, args.preview)
    glbs = _variant_paths(args.out, len(result.meshes))
    place = None if camera is None else lambda variants: place_variants(variants, views[0], camera)
    for written in write_results(result.meshes, result.gaussians, glbs, outputs, finish=place):
        for notice in written.notices:
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
    if pipeline.config.tiny_random_weights:
        print(f"{RANDOM_WEIGHTS_NOTICE} ({folder})")
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


def _replicas(args: argparse.Namespace):
    """The Ray replica options, refused without --ray (they would be silently ignored)."""
    from amodal3r.service.ray_cluster import Replicas

    given = [f"--{name.replace('_', '-')}" for name in RAY_ONLY if getattr(args, name, None) is not None]
    if args.ray is None and given:
        raise InputError(f"{', '.join(given)} only apply with --ray")
    return Replicas(args.replicas, args.gpus_per_replica, args.cpus_per_replica or 1.0).check()


def _batch(args: argparse.Namespace) -> int:
    from amodal3r.api.protocol import JobParams
    from amodal3r.io.batch_inputs import read_batch
    from amodal3r.service.batch import SUMMARY_FILE, BatchSpec, LocalExecutor, plan_batch, run_batch
    from amodal3r.weights.hub import resolve_model

    replicas = _replicas(args)
    params = JobParams(
        seed=args.seed,
        multiview=args.multiview,
        structure_steps=args.steps,
        slat_steps=args.steps,
        structure_cfg=args.cfg,
        slat_cfg=args.cfg,
        texture_size=args.texture_size,
        faces=args.faces,
        gaussians=args.gaussians,
        preview=args.preview,
    ).validate()
    if args.ray is not None:
        from amodal3r.service.ray_cluster import require_ray

        require_ray()
    items = read_batch(args.input)
    if args.input.is_dir() and args.out_dir.resolve() == args.input.resolve():
        raise InputError(f"--out-dir {args.out_dir} is the input folder: write the results into another folder")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(args.model)
    local_folder = Path(args.model).expanduser().exists()  # else a Hugging Face id, resolved where it runs
    spec = BatchSpec(str(model_dir.resolve()) if local_folder else args.model, params, args.device, args.dtype)
    plan = plan_batch(items, args.out_dir, params)
    executor = None
    if plan.todo and args.ray is not None:
        from amodal3r.service.ray_batch import RayExecutor
        from amodal3r.service.ray_cluster import cluster_gpus, connect

        ray = connect(args.ray)
        executor = RayExecutor(ray, spec, replicas.resolved(cluster_gpus(ray)), args.out_dir)
    elif plan.todo:
        executor = LocalExecutor(model_dir, spec, args.out_dir)
    failed = run_batch(plan, args.out_dir, executor, sys.stderr)
    written = len(plan.todo) - (failed - len(plan.bad))
    print(
        f"{written} written, {len(plan.skipped)} already there, {failed} failed of {len(plan.items)}; "
        f"see {args.out_dir / SUMMARY_FILE}"
    )
    return 1 if failed else 0


def _serve(args: argparse.Namespace) -> int:
    from amodal3r.pipelines.devices import configure_cpu
    from amodal3r.service.app import ServerConfig, serve

    configure_cpu(args.threads)
    replicas = _replicas(args)
    config = ServerConfig(
        model_dir=args.model,
        data_dir=args.data_dir,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        idle_unload=args.idle_unload,
        sam_checkpoints=dict(args.sam_checkpoint),
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        allow_hosts=args.allow_host,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
    )
    if args.ray is None:
        return serve(config)
    from amodal3r.service.ray_serve import serve_on_ray

    return serve_on_ray(config, args.ray, replicas, (args.min_replicas, args.max_replicas))


RAY_ONLY = ("replicas", "gpus_per_replica", "cpus_per_replica", "min_replicas", "max_replicas")


def _ray_options(parser: argparse.ArgumentParser, autoscale: bool) -> None:
    from amodal3r.service.ray_cluster import LOCAL

    group = parser.add_argument_group("Ray (pip install 'amodal3r[ray]')")
    group.add_argument(
        "--ray",
        nargs="?",
        const=LOCAL,
        metavar="ADDRESS",
        help="run on Ray: no ADDRESS starts a local Ray for the run, HOST:PORT or 'auto' joins a cluster "
        "(a bare --ray takes the next word as its ADDRESS: put other arguments first)",
    )
    group.add_argument("--replicas", type=int, help="pipelines to run at once (default: one per GPU, else 1)")
    if autoscale:
        group.add_argument("--min-replicas", type=int, help="autoscale on the job queue from this many replicas")
        group.add_argument("--max-replicas", type=int, help="... up to this many")
    group.add_argument("--gpus-per-replica", type=float, help="default: 1 when the cluster has GPUs, else 0")
    group.add_argument("--cpus-per-replica", type=float, help="CPU cores each replica uses (default: 1)")


def _setting(field: str, kind: type) -> Callable[[str], object]:
    """An argparse type that checks a value against ``JobParams.<field>``'s bounds, before any work."""

    def parse(text: str) -> object:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {KIND_NAMES[kind]}: {text!r}") from None
        try:
            check_setting(JobParams, field, value)
        except ProtocolError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return value

    return parse


def add_run_options(parser: argparse.ArgumentParser, variants: bool = True) -> None:
    """Seed, sampler, variants, views and device: the options of every command that runs the model
    (a batch writes one result per item, so it takes no ``--variants``)."""
    parser.add_argument("--seed", type=_setting("seed", int), default=0)
    parser.add_argument(
        "--steps",
        type=_setting("structure_steps", int),
        help="sampler steps of both stages (default: pipeline.json's, 25)",
    )
    parser.add_argument(
        "--cfg",
        type=_setting("structure_cfg", float),
        help="guidance strength of both stages (default: pipeline.json's, 7.5 for the structure, 3.0 for the latent)",
    )
    if variants:
        parser.add_argument("--variants", type=_setting("variants", int), default=1)
    parser.add_argument("--multiview", choices=MULTIVIEW_MODES, default="stochastic")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=DTYPES, help="compute dtype (default: fp16 checkpoints in fp16 on GPUs)")


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """What is written per variant: texture, faces, Gaussians, preview."""
    parser.add_argument("--texture-size", type=_setting("texture_size", int), default=1024)
    parser.add_argument(
        "--faces",
        type=_setting("faces", int),
        help="decimate to about this many faces before unwrapping",
    )
    parser.add_argument("--gaussians", action="store_true", help="also write the 3D Gaussians as .ply")
    parser.add_argument("--preview", action="store_true", help="also write a front-view preview .png")


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _camera_options(parser: argparse.ArgumentParser) -> None:
    camera = parser.add_mutually_exclusive_group()
    camera.add_argument(
        "--camera",
        type=Path,
        help="camera.json: width, height, fx, fy, cx, cy in pixels (OpenCV convention, the full photo)",
    )
    camera.add_argument(
        "--fov",
        type=_setting("fov", float),
        help="horizontal field of view in degrees (default: the photo's EXIF 35 mm focal length, else 50 mm)",
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
    parser = _OneLineParser(prog="amodal3r", description="Amodal3R occluded-object reconstruction")
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
    add_run_options(slat)
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
    add_run_options(rec)
    add_output_options(rec)
    rec.add_argument(
        "--place",
        action="store_true",
        help="also fit each result's pose to the first view's photo: OUT.pose.json (see amodal3r place)",
    )
    _camera_options(rec)

    place = commands.add_parser(
        "place",
        help="fit a reconstructed GLB's pose to the photo's masks -> pose.json",
        description="Rotation and translation of the GLB (scale 1) whose silhouette matches the visible target; "
        "occluded pixels count for nothing. pose.json maps the GLB's coordinates into the OpenCV camera frame.",
    )
    place.add_argument("--mesh", type=Path, required=True, help="the reconstructed .glb")
    place.add_argument("--image", type=Path, required=True, help="the photo (the full frame the camera describes)")
    place.add_argument("--target-mask", type=Path, help="visible part of the target (white)")
    place.add_argument("--occluder-mask", type=Path, help="occluders in front of it (white)")
    place.add_argument("--mask", type=Path, help="one mask: grey format or labels 0/1/2")
    place.add_argument("--out", type=Path, required=True, help="the pose.json to write")
    _camera_options(place)
    place.set_defaults(run=_place)
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
    srv.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host header name to accept besides loopback and the bound address (repeatable; * for any)",
    )
    srv.add_argument(
        "--header-timeout",
        type=float,
        default=HEADER_TIMEOUT_S,
        help="seconds a client may take to send its request headers (default: %(default)s)",
    )
    srv.add_argument(
        "--body-timeout",
        type=float,
        default=BODY_IDLE_TIMEOUT_S,
        help="seconds a request body may stall before the request gets 408 (default: %(default)s)",
    )
    _ray_options(srv, autoscale=True)
    srv.set_defaults(run=_serve)

    batch = commands.add_parser(
        "batch",
        help="a folder or CSV of photos with masks -> one GLB each, here or over a Ray cluster",
        description="INPUT: a folder of NAME.png|jpg with NAME_target.png [+ NAME_occluder.png] or NAME_mask.png, "
        "or a CSV with the columns image,target_mask,occluder_mask,mask[,object] (paths relative to it; rows "
        "with the same object are views of one object). Exit 0: all done; 1: some failed (the rest are "
        "written); 2: bad arguments.",
    )
    batch.add_argument("input", type=Path, help="folder or .csv")
    batch.add_argument("--out-dir", type=Path, required=True, help="NAME.glb per item, and summary.csv")
    batch.add_argument("--model", required=True, help="model folder or Hugging Face id")
    add_run_options(batch, variants=False)
    add_output_options(batch)
    _ray_options(batch, autoscale=False)
    batch.set_defaults(run=_batch)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or an argument error already printed
        return int(done.code or 0)
    try:
        return args.run(args)
    except (Amodal3RError, ValueError, OSError) as e:
        print(f"amodal3r: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("amodal3r: interrupted: no output of this run was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
