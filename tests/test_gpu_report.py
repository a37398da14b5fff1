"""benchmarks/gpu_report.py's summaries from figures (GPU-free: made-up entries with known ratios)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "benchmarks" / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loop_block_and_dispatch_summaries(report):
    loop = dict(kind="sampler_loop", model="digits", batch=16, loop="student4", steps=4)
    entries = [{**loop, "mode": "network", "ms_per_sample": 1.0}, {**loop, "mode": "eager", "ms_per_sample": 6.0},
               {**loop, "mode": "graph", "ms_per_sample": 1.5}, {**loop, "mode": "compile", "ms_per_sample": 3.0},
               dict(kind="attention", shape="s", bhnd=[1, 1, 4, 8], impl="triton", tflops=50.0),
               dict(kind="attention", shape="s", bhnd=[1, 1, 4, 8], impl="CUDNN_ATTENTION", tflops=100.0),
               dict(kind="attention", shape="s", bhnd=[1, 1, 4, 8], impl="dispatch", tflops=98.0),
               dict(kind="attention_block", shape="b", bchw=[1, 8, 4, 4], head_dim=8, impl="dispatch", ms=2.0,
                    dispatch={"k": "sdpa-cudnn"}),
               dict(kind="attention_block", shape="b", bchw=[1, 8, 4, 4], head_dim=8, impl="sdpa", ms=3.0)]
    (row,) = report.sampler_loop_summary(entries)
    assert row["graph_speedup_vs_eager"] == 4.0 and row["graph_speedup_vs_compile"] == 2.0
    assert row["graph_over_network"] == 1.5 and row["eager_over_network"] == 6.0
    (attn,) = report.attention_summary(entries)
    assert attn["fastest_sdpa"] == "CUDNN_ATTENTION" and attn["triton_over_fastest_sdpa"] == 0.5
    assert attn["dispatch_over_fastest"] == pytest.approx(0.98)
    (block,) = report.attention_block_summary(entries)
    assert block["sdpa_over_dispatch"] == 1.5 and block["dispatch"] == {"k": "sdpa-cudnn"}
    targets = report.targets([], [attn])
    assert targets["attention_dispatch_over_fastest"]["met"] is True
    assert targets["sampler_step_4M_graphed_fraction_of_copy"]["met"] is None  # not measured: no verdict


def test_graphed_step_fraction_of_copy(report):
    base = dict(kind="sampler_step", size="4M", numel=2**22, dtype="bf16")
    steps = report.sampler_step_summary([{**base, "impl": "copy", "ms": 1.0, "gbps": 2000.0},
                                         {**base, "impl": "triton", "ms": 1.0, "gbps": 900.0},
                                         {**base, "impl": "triton_graph", "ms": 1.0, "gbps": 1900.0}])
    assert steps[0]["triton_graph"]["fraction_of_copy"] == 0.95
    assert report.targets(steps, [])["sampler_step_4M_graphed_fraction_of_copy"] == {
        "values": {"4M-bf16": 0.95}, "bound": 0.9, "met": True}
