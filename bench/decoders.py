"""Time and size the structured-latent decoders on the CPU: mesh (FlexiCubes) and Gaussians.

Each case runs in a fresh subprocess, so that its peak RSS is its own. The input is a sphere shell
at 64^3 (about 20k voxels, the occupancy of a real object) with random 8-channel latents; the
models have random weights (``tiny_weights.randomize``), fp32, under ``torch.inference_mode``.
Random weights put a surface through nearly every cube, so, as ``tiny_weights.calibrate_surface``
does, the sdf channels are shifted (untimed, like a calibrated output bias) so that ``--inside`` of
the corners are inside. The default 0.2 gives meshes of the size a real object of this occupancy
has (a sphere of radius ~114 cubes at 256^3: ~160k vertices, ~330k faces); calibrate_surface's
``INSIDE`` = 0.05 gives meshes of a few thousand vertices or fewer, 0.5 the worst case (~2M faces).

Columns: the voxels in; the output (cubes at 256^3 and mesh vertices/faces, or Gaussians); the
wall time of ``decode`` (trunk + upsampling, or trunk + output layer) and of the extraction
(``to_representation``: FlexiCubes, or building the Gaussians); RSS after building the model and
input, peak RSS up to the end of ``decode`` and over the whole run; and for scale the size of a
dense grid of the output features at full channel count (101 float32 channels at 256^3 for the
mesh decoder, its per-voxel output channels at 64^3 for the Gaussian decoder) and of a dense 64^3
grid of the trunk features (model_channels float32).

    .venv/bin/python bench/decoders.py [--threads N] [--radius 28.5] [--medium-radius R] [--seed 0] [--inside 0.2]
        [--configs tiny,medium,full] [--dtype float32|bfloat16|float16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from amodal3r.models.structured_latent_gaussian_decoder import SLatGaussianDecoder
from amodal3r.models.structured_latent_mesh_decoder import SLatMeshDecoder
from amodal3r.modules.sparse import SparseTensor
from amodal3r.weights.tiny import randomize

RESOLUTION, LATENT_CHANNELS = 64, 8
COMMON = dict(resolution=RESOLUTION, latent_channels=LATENT_CHANNELS, mlp_ratio=4, attn_mode="swin", window_size=8)
GAUSSIAN_REPRESENTATION = {  # as /work/shared/golden/slat_dec_gs/model.json, num_gaussians per config
    "lr": {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0, "_rotation": 0.1},
    "perturb_offset": True,
    "voxel_size": 1.5,
    "2d_filter_kernel_size": 0.1,
    "3d_filter_kernel_size": 9e-4,
    "scaling_bias": 4e-3,
    "opacity_bias": 0.1,
    "scaling_activation": "softplus",
}
CONFIGS = {
    "tiny": {
        "mesh": dict(model_channels=256, num_blocks=2, num_heads=4),
        "gaussians": dict(model_channels=64, num_blocks=2, num_heads=4, num_gaussians=8),
    },
    "medium": {
        "mesh": dict(model_channels=512, num_blocks=4, num_heads=8),
        "gaussians": dict(model_channels=512, num_blocks=4, num_heads=8, num_gaussians=32),
    },
    "full": {  # the official checkpoints' architectures
        "mesh": dict(model_channels=768, num_blocks=12, num_heads=12),
        "gaussians": dict(model_channels=768, num_blocks=12, num_heads=12, num_gaussians=32),
    },
}
MIB = 2**20
REALISTIC_INSIDE = 0.2  # fraction of mesh corners with sdf < 0, see the module docstring


def sphere_shell(radius: float, res: int = RESOLUTION) -> torch.Tensor:
    """``[N, 4]`` (batch 0, x, y, z) voxels with ``| |p - c| - radius | < 1``, ``c`` the grid centre."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing="ij"), dim=-1).reshape(-1, 3)
    dist = (grid.float() - (res - 1) / 2).norm(dim=1)
    shell = grid[(dist - radius).abs() < 1.0]
    return torch.cat([torch.zeros(len(shell), 1, dtype=torch.long), shell], dim=1).int()


def build(config: str, model: str) -> SLatMeshDecoder | SLatGaussianDecoder:
    args = dict(CONFIGS[config][model])
    if model == "mesh":
        decoder = SLatMeshDecoder(**COMMON, **args, representation_config={"use_color": True})
    else:
        rep = dict(GAUSSIAN_REPRESENTATION, num_gaussians=args.pop("num_gaussians"))
        decoder = SLatGaussianDecoder(**COMMON, **args, representation_config=rep)
    return decoder.eval()


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(
    config: str, model: str, radius: float, seed: int, inside: float = REALISTIC_INSIDE, dtype: str = "float32"
) -> dict:
    """One case, meant for a fresh process: the peak RSS covers this case only."""
    generator = torch.Generator().manual_seed(seed)
    decoder = build(config, model)
    randomize(decoder, generator)
    decoder.set_torso_dtype(getattr(torch, dtype))
    coords = sphere_shell(radius)
    latent = SparseTensor(torch.randn(len(coords), LATENT_CHANNELS, generator=generator), coords)
    result = dict(
        config=config,
        model=model,
        radius=radius,
        voxels=len(coords),
        model_channels=decoder.model_channels,
        out_channels=decoder.out_channels,
        rss_built=max_rss_mib(),
    )
    with torch.inference_mode():
        start = time.perf_counter()
        out = decoder.decode(latent)
        result["decode_s"] = time.perf_counter() - start
        result["rss_decode"] = max_rss_mib()
        result["out_rows"] = out.feats.shape[0]
        if model == "mesh":
            sdf = out.feats[:, :8]
            sdf -= torch.quantile(sdf.flatten()[::5], inside)  # untimed: a calibrated output bias
        start = time.perf_counter()
        rep = decoder.to_representation(out)[0]
        result["extract_s"] = time.perf_counter() - start
    if model == "mesh":
        result["vertices"], result["faces"] = rep.vertices.shape[0], rep.faces.shape[0]
    else:
        result["gaussians"] = rep._xyz.shape[0]
    result["rss_peak"] = max_rss_mib()
    return result


def run_case(config: str, model: str, radius: float, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--one",
        config,
        model,
        "--radius",
        str(radius),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
        "--inside",
        str(args.inside),
        "--dtype",
        args.dtype,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"case {config} {model} failed with exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def row(r: dict) -> str:
    if r["model"] == "mesh":
        output = f"{r['out_rows']} cubes, {r['vertices']} v / {r['faces']} f"
        dense_out = 256**3 * r["out_channels"] * 4 / MIB
    else:
        output = f"{r['gaussians']} Gaussians"
        dense_out = RESOLUTION**3 * r["out_channels"] * 4 / MIB
    dense_trunk = RESOLUTION**3 * r["model_channels"] * 4 / MIB
    return (
        f"| {r['model']:<9} | {r['config']:<6} | {r['radius']:>6g} | {r['voxels']:>6} | {output:<36} "
        f"| {r['decode_s']:>10.2f} | {r['extract_s']:>11.2f} | {r['rss_built']:>9.0f} | {r['rss_decode']:>11.0f} "
        f"| {r['rss_peak']:>9.0f} | {dense_out:>14.0f} | {dense_trunk:>16.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--radius", type=float, default=28.5, help="shell radius in voxels (64^3 grid)")
    parser.add_argument(
        "--medium-radius", type=float, default=None, help="shell radius for the medium config only (default: --radius)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--inside",
        type=float,
        default=REALISTIC_INSIDE,
        help="fraction of mesh corners shifted inside (sdf < 0); 0.5 is the worst case",
    )
    parser.add_argument("--configs", default="tiny,medium", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="the trunk's dtype"
    )
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(*args.one, args.radius, args.seed, args.inside, args.dtype)), flush=True)
        return
    medium_radius = args.medium_radius if args.medium_radius is not None else args.radius
    print(
        f"torch {torch.__version__}, {args.threads} threads, trunk in {args.dtype}, one run per fresh process, "
        f"{args.inside:g} of mesh corners inside; "
        f"sphere shell of {len(sphere_shell(args.radius))} voxels at 64^3 (radius {args.radius:g})"
        + (
            f", medium on radius {medium_radius:g} ({len(sphere_shell(medium_radius))} voxels)"
            if medium_radius != args.radius
            else ""
        )
        + "\n"
    )
    print(
        f"| {'decoder':<9} | {'config':<6} | {'radius':>6} | {'voxels':>6} | {'output':<36} | {'decode (s)':>10} "
        f"| {'extract (s)':>11} | {'RSS built':>9} | {'peak decode':>11} | {'peak RSS':>9} "
        f"| {'dense out MiB':>14} | {'dense trunk MiB':>16} |"
    )
    print(
        f"|{'-' * 11}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 38}|{'-' * 12}|{'-' * 13}|{'-' * 11}|{'-' * 13}"
        f"|{'-' * 11}|{'-' * 16}|{'-' * 18}|"
    )
    for config in args.configs.split(","):
        radius = medium_radius if config == "medium" else args.radius
        for model in ("mesh", "gaussians"):
            print(row(run_case(config, model, radius, args)), flush=True)
    print(
        "\nRSS columns in MiB (ru_maxrss). Dense out: mesh 101 ch at 256^3, Gaussians 14 x num_gaussians ch "
        "at 64^3; dense trunk: model_channels at 64^3; all float32."
    )


if __name__ == "__main__":
    main()
