"""The golden tests read every size from the case's own files: they pass on another golden folder of
the documented format (tests/golden/README.md) whose cond has three rows and whose DINOv2 is wider
and shallower, and which does not name the DINOv2 case's source picture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import GOLDEN_ENV, REPO_ROOT, golden_dir
from safetensors.torch import load_file, save_file

from amodal3r.models.image_encoder import DinoV2Config, DinoV2Encoder

GOLDEN_TESTS = [
    "tests/models/test_golden_models.py",
    "tests/models/test_image_encoder.py",
    "tests/pipelines/test_conditioning.py",
]


def write_cond_with_three_rows(source: Path, out: Path) -> None:
    """The shipped rows (the model cases index them) plus a third random one, with its checksum."""
    parts = load_file(source / "cond.safetensors")
    g = torch.Generator().manual_seed(1)
    extra = {
        "tokens_i8": torch.randint(-100, 100, (1, *parts["tokens_i8"].shape[1:]), generator=g, dtype=torch.int8),
        "vis_ratio": torch.randint(0, 197, (1, parts["vis_ratio"].shape[1]), generator=g).float() / 196,
        "occ_ratio": torch.randint(0, 197, (1, parts["occ_ratio"].shape[1]), generator=g).float() / 196,
    }
    parts = {k: torch.cat([v, extra[k]]).contiguous() for k, v in parts.items()}
    out.mkdir()
    save_file(parts, str(out / "cond.safetensors"))
    width = parts["tokens_i8"].shape[-1]
    cond = torch.cat(
        [
            parts["tokens_i8"].float() / 32,
            parts["vis_ratio"][..., None].repeat(1, 1, width),
            parts["occ_ratio"][..., None].repeat(1, 1, width),
        ],
        dim=1,
    )
    meta = json.loads((source / "cond.json").read_text())
    meta.update(batch=3, cond_shape=list(cond.shape), cond_sum_f64=cond.double().sum().item())
    (out / "cond.json").write_text(json.dumps(meta))


def write_other_dinov2(out: Path) -> None:
    """A DINOv2 of other width and depth in the hub layout, with its outputs on a random picture."""
    config = DinoV2Config(embed_dim=96, depth=1, num_heads=3, init_values=1.0)
    torch.manual_seed(2)
    model = DinoV2Encoder(config).eval()
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config.to_dict()))
    save_file(
        {k: v.contiguous() for k, v in model.hub_state_dict().items()}, str(out / "dinov2_hub_format.safetensors")
    )
    image = model.normalize(torch.rand(1, 3, 518, 518, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        x_prenorm = model.forward_prenorm(image)
    tokens = torch.nn.functional.layer_norm(x_prenorm, x_prenorm.shape[-1:], eps=1e-5)
    save_file({"image": image, "x_prenorm": x_prenorm, "tokens": tokens}, str(out / "io.safetensors"))


def test_golden_tests_hold_for_another_golden_folder(tmp_path: Path) -> None:
    folder = tmp_path / "golden"
    folder.mkdir()
    for case in golden_dir().iterdir():
        if case.name not in ("cond", "dinov2"):
            (folder / case.name).symlink_to(case)
    write_cond_with_three_rows(golden_dir() / "cond", folder / "cond")
    write_other_dinov2(folder / "dinov2")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "golden", *GOLDEN_TESTS],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, GOLDEN_ENV: str(folder)},
    )
    assert run.returncode == 0, run.stdout[-3000:]
    assert " failed" not in run.stdout and " passed" in run.stdout
    assert "1 skipped" in run.stdout  # the full-path DINOv2 check: this case names no source picture
