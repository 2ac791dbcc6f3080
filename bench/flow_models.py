"""Time one forward of each flow model on the CPU (tiny and medium configs, fp32 and bf16).

Batch 2 is the guided pair (conditional + unconditional) that the sampler runs as one forward.
For scale, the issue measured the reference's medium structure flow on a 2-core machine of this
kind at 1.53 s (batch 1) and 3.08 s (batch 2) in fp32.

    .venv/bin/python bench/flow_models.py [--repeat 3] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from amodal3r.models.sparse_structure_flow import SparseStructureFlowModelMaskAsCondWeighted
from amodal3r.models.structured_latent_flow import SLatFlowModelMaskAsCondWeighted
from amodal3r.modules.sparse import SparseTensor

COND_CHANNELS = 1024
CONFIGS = {
    "tiny": dict(model_channels=64, num_blocks=2, num_heads=4),
    "medium": dict(model_channels=256, num_blocks=4, num_heads=4),
}


def sphere_shell(radius: float = 24.0, res: int = 64) -> torch.Tensor:
    """Voxels of a sphere surface, about the occupancy of a real object at 64^3."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing="ij"), dim=-1).reshape(-1, 3)
    dist = (grid.float() - (res - 1) / 2).norm(dim=1)
    shell = grid[(dist - radius).abs() < 1.0]
    return torch.cat([torch.zeros(len(shell), 1, dtype=torch.long), shell], dim=1).int()


def condition(batch: int) -> torch.Tensor:
    """Image tokens, then per-patch visibility and occlusion ratios: multiples of 1/196 (14x14 pixels)."""
    tokens = torch.randn(batch, 1374, COND_CHANNELS)
    ratios = (torch.rand(batch, 2 * 1369, 1) * 196).round() / 196
    return torch.cat([tokens, ratios.expand(-1, -1, COND_CHANNELS)], dim=1)


def timed(fn, repeat: int) -> float:
    with torch.inference_mode():
        fn()
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
    return best


def structure_forward(size: str, dtype: torch.dtype, batch: int):
    model = SparseStructureFlowModelMaskAsCondWeighted(
        resolution=16,
        in_channels=8,
        out_channels=8,
        cond_channels=COND_CHANNELS,
        patch_size=1,
        qk_rms_norm=True,
        **CONFIGS[size],
    ).eval()
    model.set_torso_dtype(dtype)
    x, t, cond = torch.randn(batch, 8, 16, 16, 16), torch.full((batch,), 500.0), condition(batch)
    return lambda: model(x, t, cond)


def latent_forward(size: str, dtype: torch.dtype, batch: int):
    model = SLatFlowModelMaskAsCondWeighted(
        resolution=64,
        in_channels=8,
        out_channels=8,
        cond_channels=COND_CHANNELS,
        patch_size=2,
        io_block_channels=[128] if size == "medium" else [32],
        num_io_res_blocks=2 if size == "medium" else 1,
        qk_rms_norm=True,
        **CONFIGS[size],
    ).eval()
    model.set_torso_dtype(dtype)
    coords = sphere_shell()
    x = SparseTensor(torch.randn(len(coords), 8), coords).repeat_batch(batch)
    t, cond = torch.full((batch,), 500.0), condition(batch)
    return lambda: model(x, t, cond)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, best of {args.repeat}; "
        f"latent on a sphere shell of {len(sphere_shell())} voxels at 64^3\n"
    )
    print(f"| {'model':<17} | {'config':<6} | {'dtype':<8} | {'batch 1 (s)':>11} | {'batch 2 (s)':>11} |")
    print(f"|{'-' * 19}|{'-' * 8}|{'-' * 10}|{'-' * 13}|{'-' * 13}|")
    for name, build in (("structure flow", structure_forward), ("structured latent", latent_forward)):
        for size in CONFIGS:
            for dtype in (torch.float32, torch.bfloat16):
                times = [timed(build(size, dtype, batch), args.repeat) for batch in (1, 2)]
                label = str(dtype).removeprefix("torch.")
                print(f"| {name:<17} | {size:<6} | {label:<8} | {times[0]:>11.3f} | {times[1]:>11.3f} |", flush=True)


if __name__ == "__main__":
    main()
