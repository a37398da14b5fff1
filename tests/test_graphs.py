"""CUDA graphs of fixed-grid sampler loops (fastdiff.graphs): the static-buffer loop against a plain run (on CPU
through its eager stand-in, on CUDA as a captured graph), the sweep's option and its errors."""
from __future__ import annotations

import pytest
import torch

from fastdiff.errors import FastdiffError
from fastdiff.graphs import GraphedLoop, use_graphs
from fastdiff.models import build_model, model_config
from fastdiff.samplers import _TABLES, ddim, initial_noise, make_grid
from fastdiff.schedules import Schedule
from fastdiff.sweep import Network, Spec, _body, sample_batch

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
SCHEDULE = Schedule("cosine", 1000)


def _unet(device, num_classes=0):
    torch.manual_seed(0)
    cfg = model_config("unet", (1, 8, 8), num_classes, dict(channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                                            attn_resolutions=(4,), head_dim=8))
    return build_model(cfg).to(device).eval()


def _cfg(**kw):
    from fastdiff.bench import BenchConfig

    return BenchConfig(model="x", n_samples=12, batch_size=4, seed=3, clip=True, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", [Spec("ddpm-strided", "linspace", 4, None, "large"), Spec("ddim", "quadratic", 3, 0.0),
                                  Spec("ddim-eta1", "linspace", 3, 1.0)])
def test_graphed_loop_equals_the_eager_run_batch_after_batch(device, spec):
    """One loop (captured on CUDA, its eager stand-in on CPU) replayed for three batches with other sample indices
    and seeds gives each exactly what a fresh eager run gives it: nothing of the first batch is baked in."""
    network = Network(_unet(device), SCHEDULE, "v", "tiny")
    cfg = _cfg()
    body = _body(spec, network, cfg)
    x, noise = initial_noise(range(4), (1, 8, 8), cfg.seed, device)
    loop = GraphedLoop(body, x, noise)
    assert (loop.graph is not None) == (device == "cuda")
    for start, seed in ((0, 3), (4, 3), (4, 9)):
        x, noise = initial_noise(range(start, start + 4), (1, 8, 8), seed, device)
        got = loop(x, noise).clone()
        with torch.no_grad():
            want = body(x, noise, None).x  # the loop used only its indices and seed: draw 1 is next
        assert loop.nfe == spec.steps
        assert torch.equal(got, want), (start, seed)


@pytest.mark.parametrize("device", DEVICES)
def test_graphed_loop_carries_the_condition_in_a_static_buffer(device):
    network = Network(_unet(device, num_classes=10), SCHEDULE, "v", "tiny-cond", num_classes=10, cond="class")
    spec = Spec("ddim", "linspace", 3, 0.0, guidance=2.0)
    body = _body(spec, network, _cfg())
    x, noise = initial_noise(range(4), (1, 8, 8), 0, device)
    loop = GraphedLoop(body, x, noise, torch.tensor([0, 1, 2, 3], device=device))
    for y in ([0, 1, 2, 3], [7, 7, 1, 0]):
        y = torch.tensor(y, device=device)
        x, noise = initial_noise(range(4), (1, 8, 8), 0, device)
        got = loop(x, noise, y).clone()
        x, noise = initial_noise(range(4), (1, 8, 8), 0, device)
        with torch.no_grad():
            assert torch.equal(got, body(x, noise, y).x)


def test_the_sweep_row_is_the_same_with_and_without_graphs_and_says_which_ran():
    """On CPU `auto` is a no-op (rows say cuda_graph false); the graphed batch path with its CPU stand-in forced
    gives the eager samples exactly."""
    network = Network(_unet("cpu"), SCHEDULE, "v", "tiny")
    spec = Spec("distilled", "student", 2, 0.0)
    plain = sample_batch(spec, network, (1, 8, 8), _cfg(), torch.device("cpu"), 4, graphs={})
    assert plain["cuda_graph"] is False
    import fastdiff.sweep as sweep

    graphs: dict = {}
    orig = sweep.use_graphs
    try:
        sweep.use_graphs = lambda mode, device, sampler: True  # the CUDA decision, taken on CPU: the stand-in runs
        first = sample_batch(spec, network, (1, 8, 8), _cfg(), torch.device("cpu"), 4, graphs=graphs)
        again = sample_batch(spec, network, (1, 8, 8), _cfg(), torch.device("cpu"), 8, graphs=graphs)
    finally:
        sweep.use_graphs = orig
    assert first["cuda_graph"] and list(graphs) == [4]
    assert torch.equal(first["x"], plain["x"]) and first["nfe"] == plain["nfe"] == 2
    assert torch.equal(again["x"], sample_batch(spec, network, (1, 8, 8), _cfg(), torch.device("cpu"), 8)["x"])


def test_cuda_graph_options_and_errors():
    cpu = torch.device("cpu")
    assert not use_graphs("auto", cpu, "ddim") and not use_graphs("off", cpu, "ddim")
    with pytest.raises(FastdiffError, match="needs a CUDA device"):
        use_graphs("on", cpu, "ddim")
    with pytest.raises(FastdiffError, match="choose one of"):
        use_graphs("always", cpu, "ddim")
    gpu = torch.device("cuda")
    assert use_graphs("auto", gpu, "distilled") and not use_graphs("auto", gpu, "dpm++2m")
    x, noise = initial_noise(range(2), (3,), 0, "cpu", rng="torch-cpu")
    with pytest.raises(FastdiffError, match="--noise philox"):
        GraphedLoop(lambda x, n, y: x, x, noise)
    x, noise = initial_noise(range(2), (3,), 0, "cpu")
    loop = GraphedLoop(lambda x, n, y: x * 2, x, noise)
    with pytest.raises(FastdiffError, match="batch shape"):
        loop(torch.zeros(3, 3), noise)


def test_bench_refuses_cuda_graphs_on_without_a_gpu(tmp_path, capsys):
    from fastdiff.bench import main
    from fastdiff.errors import run_cli

    assert run_cli(main, ["--model", str(tmp_path / "none"), "--cuda-graphs", "on", "--device", "cpu",
                          "--out-dir", str(tmp_path / "out")]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_sampler_on_a_known_grid_copies_nothing_from_the_host():
    """affine_steps keeps its tables on the device per grid: the second run reuses the first's tensors (a host copy
    inside a CUDA graph capture would fail)."""
    net = lambda x, t: torch.zeros_like(x)  # noqa: E731
    ts = make_grid("linspace", 5, SCHEDULE)
    x = torch.randn(2, 3)
    ddim(net, x, ts, schedule=SCHEDULE, param="eps")
    before = {k: tuple(map(id, v)) for k, v in _TABLES.items()}
    ddim(net, x, ts, schedule=SCHEDULE, param="eps")
    assert {k: tuple(map(id, v)) for k, v in _TABLES.items()} == before


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_graph_of_the_fused_step_with_device_noise_replays_bit_for_bit():
    """DDPM through the fused step with in-kernel Philox noise, captured: equal to the eager run, for new seeds."""
    network = Network(_unet("cuda"), SCHEDULE, "v", "tiny")
    spec = Spec("ddpm-strided", "linspace", 8, None, "large")
    body = _body(spec, network, _cfg())
    x, noise = initial_noise(range(16), (1, 8, 8), 0, "cuda")
    loop = GraphedLoop(body, x, noise)
    for seed in (0, 1, 2**40):
        x, noise = initial_noise(range(16), (1, 8, 8), seed, "cuda")
        got = loop(x, noise).clone()
        x, noise = initial_noise(range(16), (1, 8, 8), seed, "cuda")
        with torch.no_grad():
            assert torch.equal(got, body(x, noise, None).x)
