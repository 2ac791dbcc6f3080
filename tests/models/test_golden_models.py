"""The flow models, the structure decoder and the sampler against the reference implementation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_close, golden_case, golden_cond
from safetensors.torch import load_file

from amodal3r.models._checkpoints import load_model
from amodal3r.modules.sparse import SparseTensor
from amodal3r.pipelines.samplers import SamplerSettings, sample, time_pairs


def _model(case: str):
    return load_model(golden_case(case) / "model", device="cpu", dtype=torch.float32)


def _io(case: str) -> dict[str, torch.Tensor]:
    return load_file(golden_case(case) / "io.safetensors")


def _cond_rows(case: str) -> torch.Tensor:
    rows = json.loads((golden_case(case) / "io.json").read_text())["cond_rows"]
    return golden_cond()[rows]


def check_ss_flow() -> None:
    io = _io("ss_flow")
    with torch.inference_mode():
        out = _model("ss_flow")(io["x"], io["t"], _cond_rows("ss_flow"))
    assert_close(out, io["velocity"], rel=1e-6)


def check_ss_dec() -> None:
    io = _io("ss_dec")
    with torch.inference_mode():
        logits = _model("ss_dec")(io["z"])
    assert_close(logits, io["logits"], rel=1e-5)
    coords = torch.argwhere(logits > 0)[:, [0, 2, 3, 4]].int()
    assert torch.equal(coords, io["coords"])


def check_slat_flow() -> None:
    io = _io("slat_flow")
    x = SparseTensor(io["feats"], io["coords"])
    with torch.inference_mode():
        out = _model("slat_flow")(x, io["t"], _cond_rows("slat_flow"))
    assert torch.equal(out.coords, io["out_coords"])
    # Each element sees only its own condition (the reference's real, batch-of-one use).
    assert_close(out.feats, io["out_feats_per_element"], rel=1e-6)


def check_sampler() -> None:
    folder = golden_case("sampler")
    meta = json.loads((folder / "io.json").read_text())
    io = _io("sampler")
    flow = load_model(folder / meta["model"].replace(".{json,safetensors}", ""), device="cpu")
    settings = SamplerSettings(
        steps=meta["steps"],
        cfg_strength=meta["cfg_strength"],
        cfg_interval=tuple(meta["cfg_interval"]),
        rescale_t=meta["rescale_t"],
        sigma_min=meta["sigma_min"],
    )
    assert torch.allclose(
        torch.tensor(time_pairs(settings.steps, settings.rescale_t), dtype=torch.float64), io["t_pairs"], atol=1e-12
    )
    cond = golden_cond()[meta["cond_rows"]]
    with torch.inference_mode():
        out = sample(flow, io["noise"], cond, torch.zeros_like(cond), settings)
    assert_close(out, io["samples"], rel=1e-5)


CASES = {"ss_flow": check_ss_flow, "ss_dec": check_ss_dec, "slat_flow": check_slat_flow, "sampler": check_sampler}


@pytest.mark.parametrize("case", list(CASES))
def test_golden(case: str) -> None:
    CASES[case]()
