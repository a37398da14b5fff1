"""The attention dispatch table (fastdiff.dispatch): measurement with fake candidates on a fake clock, the JSON
cache, the CPU path through fastdiff.ops, and on CUDA the measured choice against SDPA."""
from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from fastdiff import dispatch, ops
from fastdiff.errors import FastdiffError

CUDA = torch.cuda.is_available()
KEY = "Fake GPU|torch x|triton -|float32|fwd|B<=2|heads=2|N=8|d=4"


@pytest.fixture(autouse=True)
def table(tmp_path, monkeypatch):
    """An empty in-memory table and a cache file of the test's own; returns the cache path."""
    monkeypatch.setattr(dispatch, "_TABLE", {})
    path = tmp_path / "cache" / "dispatch.json"
    monkeypatch.setenv("FASTDIFF_DISPATCH_CACHE", str(path))
    monkeypatch.delenv("FASTDIFF_DISPATCH", raising=False)
    return path


def _qkv(shape=(2, 2, 8, 4), device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(device, dtype) for _ in range(3)]


class FakeClock:
    """Candidates that advance a clock by their cost (µs) and compute SDPA; a timer that reads the clock."""

    def __init__(self):
        self.now, self.timed = 0.0, 0

    def candidate(self, cost):
        def attend(q, k, v):
            self.now += cost
            return F.scaled_dot_product_attention(q, k, v)
        return attend

    def timer(self, call):
        self.timed += 1
        start = self.now
        call()
        return self.now - start


def _broken(q, k, v):
    raise RuntimeError("No available kernel")


def test_measure_times_each_candidate_and_skips_one_that_raises():
    clock, (q, k, v) = FakeClock(), _qkv()
    fakes = {"sdpa-math": clock.candidate(30.0), "sdpa-flash": _broken, "sdpa-efficient": clock.candidate(12.5)}
    assert dispatch.measure(q, k, v, fakes, clock.timer) == {"sdpa-math": 30.0, "sdpa-efficient": 12.5}


def test_measure_times_the_backward_when_autograd_needs_it():
    clock = FakeClock()
    q, k, v = (t.requires_grad_() for t in _qkv())
    no_backward = clock.candidate(1.0)
    fakes = {"sdpa-math": clock.candidate(5.0), "sdpa-cudnn": lambda q, k, v: no_backward(q, k, v).detach()}
    assert dispatch.measure(q, k, v, fakes, clock.timer) == {"sdpa-math": 5.0}
    with torch.no_grad():
        assert dispatch.measure(q, k, v, fakes, clock.timer) == {"sdpa-math": 5.0, "sdpa-cudnn": 1.0}
    assert q.grad is None  # the measurement differentiates copies, never the caller's tensors


def _measurer(clock, costs, calls):
    q, k, v = _qkv()

    def measure_fn():
        calls.append(1)
        return dispatch.measure(q, k, v, {n: clock.candidate(c) for n, c in costs.items()}, clock.timer)
    return measure_fn


def test_lookup_picks_the_fastest_and_caches_it_in_the_json_file(table):
    clock, calls = FakeClock(), []
    costs = {"triton": 9.0, "sdpa-cudnn": 4.0, "sdpa-math": 50.0}
    assert dispatch.lookup(KEY, _measurer(clock, costs, calls), "sdpa") == "sdpa-cudnn"
    assert calls == [1] and clock.timed == 3
    data = json.loads(table.read_text())
    assert data == {"version": 1, "entries": {KEY: {"winner": "sdpa-cudnn", "times_us": costs}}}
    assert not [p for p in table.parent.iterdir() if p != table]  # no temporary file left behind
    # this process: a dict lookup; a new process (empty table): the file, still no measurement
    assert dispatch.lookup(KEY, _measurer(clock, {"triton": 1.0}, calls), "sdpa") == "sdpa-cudnn"
    dispatch._TABLE.clear()
    assert dispatch.lookup(KEY, _measurer(clock, {"triton": 1.0}, calls), "sdpa") == "sdpa-cudnn"
    assert calls == [1]
    # another key is measured and added next to the first
    other = KEY.replace("N=8", "N=16")
    assert dispatch.lookup(other, _measurer(clock, {"triton": 1.0, "sdpa-flash": 2.0}, calls), "sdpa") == "triton"
    assert calls == [1, 1]
    assert set(json.loads(table.read_text())["entries"]) == {KEY, other}


def test_lookup_falls_back_to_the_default_when_every_candidate_raises(table):
    q, k, v = _qkv()
    measure_fn = lambda: dispatch.measure(q, k, v, {"sdpa-flash": _broken}, FakeClock().timer)  # noqa: E731
    assert dispatch.lookup(KEY, measure_fn, "triton") == "triton"
    assert json.loads(table.read_text())["entries"][KEY] == {"winner": "triton", "times_us": {}}


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"version": 1, "entries": {"k": 3}}',
                                     b'{"version": 99, "entries": {}}', b"\xff\xfe"])
def test_a_corrupt_cache_is_ignored_with_a_warning_and_rewritten(table, content, caplog):
    table.parent.mkdir(parents=True)
    table.write_bytes(content)
    clock, calls = FakeClock(), []
    with caplog.at_level(logging.WARNING, logger="fastdiff.dispatch"):
        assert dispatch.lookup(KEY, _measurer(clock, {"sdpa-flash": 3.0, "sdpa-math": 8.0}, calls), "sdpa") \
            == "sdpa-flash"
    assert calls == [1]
    assert "ignoring the attention dispatch cache" in caplog.text
    assert json.loads(table.read_text())["entries"] == {KEY: {"winner": "sdpa-flash",
                                                              "times_us": {"sdpa-flash": 3.0, "sdpa-math": 8.0}}}


def test_an_unknown_winner_in_the_cache_is_measured_again(table):
    table.parent.mkdir(parents=True)
    table.write_text(json.dumps({"version": 1, "entries": {KEY: {"winner": "sdpa-someday", "times_us": {}}}}))
    calls = []
    assert dispatch.lookup(KEY, _measurer(FakeClock(), {"sdpa-math": 1.0}, calls), "sdpa") == "sdpa-math"
    assert calls == [1]


def test_cache_path_default_and_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTDIFF_DISPATCH_CACHE")
    monkeypatch.delenv("FASTDIFF_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert dispatch.cache_path() == tmp_path / ".cache" / "fastdiff" / "attention-dispatch.json"
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "c"))
    assert dispatch.cache_path() == tmp_path / "c" / "attention-dispatch.json"
    monkeypatch.setenv("FASTDIFF_DISPATCH_CACHE", str(tmp_path / "t.json"))
    assert dispatch.cache_path() == tmp_path / "t.json"


def test_key_buckets_the_batch_and_names_grad_and_triton(monkeypatch):
    monkeypatch.setattr(dispatch, "_device_name", lambda index: "Fake GPU")
    keys = {b: dispatch.key(*_qkv((b, 2, 8, 4))) for b in (1, 2, 3, 4, 5)}
    assert keys[3] == keys[4] != keys[2] != keys[1] and keys[5] != keys[4]
    assert "|B<=4|heads=2|N=8|d=4" in keys[3] and keys[3].startswith(f"Fake GPU|torch {torch.__version__}|")
    assert "|float32|fwd|" in keys[1]
    q, k, v = _qkv((3, 2, 8, 4))
    assert "|fwd+bwd|" in dispatch.key(q.requires_grad_(), k, v)
    assert "|triton -|" in dispatch.key(q, k, v, triton=False)


def test_cpu_tensors_get_default_sdpa_without_measuring(table, monkeypatch):
    monkeypatch.setattr(dispatch, "measure", _broken)
    for mode in ("on", "off"):
        monkeypatch.setenv("FASTDIFF_DISPATCH", mode)
        assert dispatch.choose(*_qkv()) == "sdpa"
    assert dispatch._TABLE == {} and not table.exists()
    monkeypatch.setenv("FASTDIFF_DISPATCH", "no")
    with pytest.raises(FastdiffError, match="FASTDIFF_DISPATCH='no'"):
        dispatch.choose(*_qkv())


def test_run_calls_the_named_implementation():
    q, k, v = _qkv()
    expected = F.scaled_dot_product_attention(q, k, v)
    for name in ("sdpa", "sdpa-math"):
        torch.testing.assert_close(dispatch.run(name, q, k, v), expected)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        dispatch.run("flash", q, k, v)


def test_ops_attention_on_cpu_goes_through_the_table_to_sdpa(monkeypatch):
    q, k, v = _qkv((2, 3, 9, 8), seed=1)
    seen = []
    real_run = dispatch.run
    monkeypatch.setattr(dispatch, "run", lambda name, *qkv: seen.append(name) or real_run(name, *qkv))
    monkeypatch.setenv("FASTDIFF_KERNELS", "auto")
    out = ops.attention(q, k, v)
    assert seen == ["sdpa"]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)
    monkeypatch.setenv("FASTDIFF_KERNELS", "torch")  # the forced paths bypass the table
    ops.attention(q, k, v)
    assert seen == ["sdpa"]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="the measured table needs a CUDA device")
def test_cuda_dispatch_matches_sdpa_and_is_stable_once_cached(table, monkeypatch):
    monkeypatch.setenv("FASTDIFF_KERNELS", "auto")
    measured, real_measure = [], dispatch.measure
    monkeypatch.setattr(dispatch, "measure", lambda *args: measured.append(1) or real_measure(*args))
    for i, shape in enumerate(((2, 4, 256, 64), (1, 2, 256, 160), (3, 8, 1024, 64))):
        q, k, v = _qkv(shape, "cuda", torch.float16)
        out = ops.attention(q, k, v)
        assert len(measured) == i + 1
        name = dispatch.key(q, k, v, triton=True)
        winner = dispatch._TABLE[name]
        entry = json.loads(table.read_text())["entries"][name]
        assert entry["winner"] == winner == min(entry["times_us"], key=entry["times_us"].get)
        assert {"sdpa-math", "sdpa-efficient"} <= set(entry["times_us"])  # backends that take any shape
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=2e-3, rtol=2e-3)
        dispatch._TABLE.clear()  # a new process: the file decides, without measuring
        assert [dispatch.choose(q, k, v) for _ in range(3)] == [winner] * 3
        # inside a graph capture a known key is a dict lookup and an unknown one the default, neither measured
        other = _qkv((1, 1, 64, 32), "cuda", torch.float16)
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            assert dispatch.choose(q, k, v) == winner
            assert dispatch.choose(*other, triton=False) == "sdpa"
        assert len(measured) == i + 1
