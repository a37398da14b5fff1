"""Collect one GPU run into results/gpu/kernels.json: environment, test outcome, every benchmark figure, the
ratios the kernel targets are stated in, and max-errors of flash attention at non-power-of-two head dims.

    python benchmarks/gpu_report.py --bench FIGURES.jsonl|BENCH.json ... --junit TESTS.xml \
        --out results/gpu/kernels.json

Runs standalone after the GPU benchmarks (`pytest benchmarks --benchmark-only`, whose figures it reads from
FASTDIFF_BENCH_LOG's JSON lines or from --benchmark-json files); a missing or failed piece is recorded as
such, never invented.
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("kernels/sampler_step.py", "kernels/attention.py", "fastdiff/ops.py", "fastdiff/noise.py",
           "fastdiff/graphs.py", "fastdiff/dispatch.py", "fastdiff/samplers.py")
STEP_TARGET_SIZES = ("16M", "64M")
ATTN_TARGET_SHAPES = ("seq1024-d64", "seq2048-d64", "seq4096-d64")


def environment():
    """Device, versions and what code was measured (git commit where .git exists, and the kernels' hash)."""
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("FASTDIFF_COMMIT", "unknown")
    digest = hashlib.sha256(b"".join((ROOT / p).read_bytes() for p in SOURCES)).hexdigest()
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device",
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "git_commit": commit,
        "kernel_sources_sha256": digest,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def test_outcome(junit):
    """Counts and failing test ids from pytest's JUnit XML."""
    if junit is None or not Path(junit).exists():
        return {"missing": str(junit)}
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {**counts, "failed": failed}


def load_entries(paths):
    """JSON-lines files of GPU figures (FASTDIFF_BENCH_LOG) or pytest-benchmark JSON files -> their entries."""
    entries = []
    for path in map(Path, paths):
        text = path.read_text() if path.exists() else ""
        if path.suffix == ".jsonl":
            entries += [json.loads(line) for line in text.splitlines() if line.strip()]
        elif text.strip():
            entries += [b["extra_info"] for b in json.loads(text)["benchmarks"] if "kind" in b["extra_info"]]
    return entries


def sampler_step_summary(entries):
    """Per (size, dtype): GB/s of each implementation, fraction of copy bandwidth, speed-ups over eager and compile."""
    rows = {}
    for e in entries:
        if e["kind"] == "sampler_step":
            rows.setdefault((e["numel"], e["dtype"]), {"size": e["size"], "numel": e["numel"], "dtype": e["dtype"]})[
                e["impl"]] = {"ms": e["ms"], "gbps": e["gbps"]}
    out = []
    for row in sorted(rows.values(), key=lambda r: (r["dtype"], r["numel"])):
        copy = row.get("copy", {}).get("gbps")
        for impl in ("triton", "triton_philox", "triton_ddim", "triton_graph"):
            if impl in row and copy:
                row[impl]["fraction_of_copy"] = row[impl]["gbps"] / copy
        for base in ("eager", "compile"):
            if "triton" in row and base in row:
                row[f"triton_speedup_vs_{base}"] = row[base]["ms"] / row["triton"]["ms"]
        out.append(row)
    return out


def attention_summary(entries):
    """Per shape: TFLOP/s of Triton and each SDPA backend that ran, and Triton over the fastest backend."""
    rows = {}
    for e in entries:
        if e["kind"] == "attention":
            rows.setdefault(e["shape"], {"shape": e["shape"], "bhnd": e["bhnd"], "tflops": {}})["tflops"][
                e["impl"]] = e["tflops"]
    for row in rows.values():
        sdpa = {k: v for k, v in row["tflops"].items() if k not in ("triton", "dispatch")}
        if sdpa and "triton" in row["tflops"]:
            row["fastest_sdpa"] = max(sdpa, key=sdpa.get)
            row["triton_over_fastest_sdpa"] = row["tflops"]["triton"] / sdpa[row["fastest_sdpa"]]
        others = {k: v for k, v in row["tflops"].items() if k != "dispatch"}
        if others and "dispatch" in row["tflops"]:
            row["dispatch_over_fastest"] = row["tflops"]["dispatch"] / max(others.values())
    return list(rows.values())


def sampler_loop_summary(entries):
    """Per (model, batch, loop): ms per sample of each mode (network alone, eager, graph, compile) and the ratios."""
    rows = {}
    for e in entries:
        if e["kind"] == "sampler_loop":
            key = (e["model"], e["batch"], e["loop"])
            rows.setdefault(key, {"model": e["model"], "batch": e["batch"], "loop": e["loop"], "steps": e["steps"],
                                  "ms_per_sample": {}})["ms_per_sample"][e["mode"]] = e["ms_per_sample"]
    for row in rows.values():
        ms = row["ms_per_sample"]
        for base in ("eager", "compile"):
            if "graph" in ms and base in ms:
                row[f"graph_speedup_vs_{base}"] = ms[base] / ms["graph"]
        for mode in ("eager", "graph", "compile"):
            if mode in ms and "network" in ms:
                row[f"{mode}_over_network"] = ms[mode] / ms["network"]
    return sorted(rows.values(), key=lambda r: (r["model"], r["loop"], r["batch"]))


def attention_block_summary(entries):
    """Per block shape: ms of the whole attention block through the dispatch table and through SDPA."""
    rows = {}
    for e in entries:
        if e["kind"] == "attention_block":
            rows.setdefault(e["shape"], {"shape": e["shape"], "bchw": e["bchw"], "head_dim": e["head_dim"],
                                         "ms": {}})["ms"][e["impl"]] = e["ms"]
            if e.get("dispatch"):
                rows[e["shape"]]["dispatch"] = e["dispatch"]
    for row in rows.values():
        if {"dispatch", "sdpa"} <= set(row["ms"]):
            row["sdpa_over_dispatch"] = row["ms"]["sdpa"] / row["ms"]["dispatch"]
    return list(rows.values())


def targets(steps, attn):
    """The GPU targets (fused step near copy bandwidth, attention at or above SDPA's fastest backend), each with the
    figures it was judged on (None: not measured)."""
    step_rows = [r for r in steps if r["size"] in STEP_TARGET_SIZES and "triton" in r]
    graph_rows = [r for r in steps if r["size"] == "4M" and "fraction_of_copy" in r.get("triton_graph", {})]
    attn_rows = [r for r in attn if r["shape"] in ATTN_TARGET_SHAPES and "triton_over_fastest_sdpa" in r]

    def verdict(values, bound):
        return {"values": values, "bound": bound,
                "met": all(v >= bound for v in values.values()) if values else None}

    def label(r):
        return f"{r['size']}-{r['dtype']}"

    return {
        "sampler_step_16M+_fraction_of_copy": verdict(
            {label(r): r["triton"]["fraction_of_copy"] for r in step_rows if "fraction_of_copy" in r["triton"]}, 0.9),
        "sampler_step_4M_graphed_fraction_of_copy": verdict(
            {label(r): r["triton_graph"]["fraction_of_copy"] for r in graph_rows}, 0.9),
        "attention_dispatch_over_fastest": verdict(
            {r["shape"]: r["dispatch_over_fastest"] for r in attn if "dispatch_over_fastest" in r}, 0.95),
        "sampler_step_16M+_speedup_vs_eager": verdict(
            {label(r): r["triton_speedup_vs_eager"] for r in step_rows if "triton_speedup_vs_eager" in r}, 3.0),
        "attention_d64_seq1024-4096_over_fastest_sdpa": verdict(
            {r["shape"]: r["triton_over_fastest_sdpa"] for r in attn_rows}, 1.0),
    }


def correctness():
    """Max |error| on the GPU: flash attention (output, gradients) vs float64 SDPA; the fused step vs its reference."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    from fastdiff.kernels import attention as flash
    from fastdiff.kernels import sampler_step as fused

    results = {}
    for d in (40, 80, 160):
        for dtype in (torch.float16, torch.bfloat16):
            key = f"attention-d{d}-{str(dtype).removeprefix('torch.')}"
            try:
                g = torch.Generator(device="cuda").manual_seed(d)
                q, k, v = (torch.randn(2, 4, 1000, d, device="cuda", generator=g, dtype=dtype).requires_grad_()
                           for _ in range(3))
                o = flash.attention(q, k, v)
                do = torch.randn_like(o)
                grads = torch.autograd.grad(o, (q, k, v), do)
                ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
                o_ref = torch.nn.functional.scaled_dot_product_attention(*ref)
                grads_ref = torch.autograd.grad(o_ref, ref, do.double())
                results[key] = {name: (a.double() - b).abs().max().item()
                                for name, a, b in zip(("o", "dq", "dk", "dv"), (o, *grads), (o_ref, *grads_ref))}
            except Exception as err:  # recorded, so the rest of the report survives
                results[key] = {"error": repr(err)}
    for dtype in (torch.float32, torch.bfloat16):
        key = f"sampler_step-{str(dtype).removeprefix('torch.')}"
        try:
            x, out, noise = (torch.randn(64, 4, 64, 64, device="cuda", dtype=dtype) for _ in range(3))
            coefs = [torch.rand(64, device="cuda") + 0.1 for _ in range(5)]
            kw = dict(param="v", clip=True, out_uncond=noise, guidance=2.0, noise=out)
            got = fused.sampler_step(x, out, *coefs, **kw)
            want = fused.sampler_step_reference(x.double(), out.double(), *[c.double() for c in coefs],
                                                **{**kw, "out_uncond": noise.double(), "noise": out.double()})
            results[key] = {"x_s": (got.double() - want).abs().max().item()}
        except Exception as err:  # recorded, so the rest of the report survives
            results[key] = {"error": repr(err)}
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", nargs="*", default=[],
                        help="FASTDIFF_BENCH_LOG .jsonl or pytest-benchmark .json files")
    parser.add_argument("--junit", help="JUnit XML of the CUDA test run")
    parser.add_argument("--out", default=str(ROOT / "results/gpu/kernels.json"))
    parser.add_argument("--no-correctness", action="store_true", help="skip the GPU max-error checks (quick rewrite)")
    args = parser.parse_args(argv)
    entries = load_entries(args.bench)
    steps, attn = sampler_step_summary(entries), attention_summary(entries)
    report = {
        **environment(),
        "tests": test_outcome(args.junit),
        "timing": "triton.testing.do_bench median (L2 flushed), sampler step bytes = tensors read + written",
        "sampler_step": steps,
        "attention": attn,
        "sampler_loop": sampler_loop_summary(entries),
        "attention_block": attention_block_summary(entries),
        "attention_config_sweep": [e for e in entries if e["kind"] == "attention_sweep"],
        "targets": targets(steps, attn),
        "correctness_max_abs_error": {"skipped": "--no-correctness"} if args.no_correctness else correctness(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, out)
    print(json.dumps(report["targets"], indent=1))


if __name__ == "__main__":
    main()
