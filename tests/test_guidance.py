"""Classifier-free guidance: the w = 0 / w = 1 limits, the batched two-pass forward, and guided distillation."""
from __future__ import annotations

import csv
import dataclasses

import pytest
import torch

from fastdiff import config as cfgs
from fastdiff.guidance import combine, conditional, guided
from fastdiff.models import MLPConfig, MLPDenoiser, UNet, UNetConfig
from fastdiff.samplers import ddim, ddpm, make_grid, sample_generators
from fastdiff.schedules import Schedule


def _randomize(net):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return net.eval()


def test_batched_two_pass_forward_equals_two_forwards():
    net = _randomize(UNet(UNetConfig(image_size=8, in_channels=1, channels=8, channel_mult=(1,), num_res_blocks=1,
                                     attn_resolutions=(8,), head_dim=8, dropout=0.0, num_classes=10)))
    x, t, y = torch.randn(5, 1, 8, 8), torch.rand(5), torch.tensor([0, 3, 9, 1, 1])
    out_c, out_u = guided(net, y, 10)(x, t)
    with torch.no_grad():
        assert torch.allclose(out_c, net(x, t, y), atol=1e-5)
        assert torch.allclose(out_u, net(x, t, torch.full_like(y, 10)), atol=1e-5)
        assert torch.allclose(out_u, net(x, t), atol=1e-5)  # y=None is the null class


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_w0_is_unconditional_and_w1_is_conditional(sampler):
    net = _randomize(MLPDenoiser(MLPConfig(dim=2, hidden=32, layers=2, num_classes=4))).double()
    schedule = Schedule("cosine", 1000)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    ts = make_grid("linspace", 8, schedule)
    x = torch.randn(6, 2, dtype=torch.float64)
    fn = {"ddim": lambda m, **kw: ddim(m, x, ts, schedule=schedule, param="v", **kw),
          "ddpm": lambda m, **kw: ddpm(m, x, ts, schedule=schedule, param="v", **kw)}[sampler]
    with torch.no_grad():
        for w, plain in [(0.0, lambda a, t: net(a, t, torch.full_like(y, 4))), (1.0, conditional(net, y))]:
            got = fn(guided(net, y, 4), guidance=w, generator=sample_generators(0, range(6))).x
            want = fn(plain, generator=sample_generators(0, range(6))).x
            # equal up to float64 rounding: BLAS may block a batch of 2B rows differently from B rows
            assert torch.allclose(got, want, rtol=0, atol=1e-12), w


def test_combine_per_sample_weights():
    c, u = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    w = torch.tensor([0.0, 1.0, 2.5])
    out = combine(c, u, w)
    assert torch.equal(out[0], u[0]) and torch.equal(out[1], c[1])
    assert torch.allclose(out[2], u[2] + 2.5 * (c[2] - u[2]))


@pytest.mark.slow
def test_guided_distillation_end_to_end(tmp_path):
    from fastdiff.checkpoint import load_model
    from fastdiff.distill import PRESETS, distill
    from fastdiff.train import PRESETS as TRAIN
    from fastdiff.train import train

    teacher = dataclasses.replace(TRAIN["toy2d"], cond="class", updates=300, hidden=64, layers=2,
                                  out_dir=str(tmp_path / "teacher"), sample_every=10_000)
    train(teacher, progress=False)
    cfg = cfgs.replace(PRESETS["digits-guided"], {
        "teacher": str(tmp_path / "teacher"), "teacher_preset": "toy2d", "pd.start_steps": 4, "pd.rounds": 1,
        "pd.updates_per_round": 20, "pd.guided_base_updates": 30, "batch_size": 64, "eval_samples": 64,
        "out_dir": str(tmp_path / "distill")})
    run = distill(cfg, progress=False)
    rows = list(csv.DictReader(open(run / "rounds.csv")))
    assert [int(r["round"]) for r in rows] == [-1, 0]
    # toy2d has no image classifier: accuracy columns are left empty there, the metric is still reported
    assert all(r["student_value"] for r in rows)
    base = load_model(run / "students" / "guided_base.pt")
    student = load_model(run / "students" / "student_N2.pt")
    assert base.config["scalar_cond"] and student.steps == 2
    x, t, y = torch.randn(4, 2), torch.full((4,), 0.5), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():  # the student really takes w as an input
        assert not torch.allclose(student.net(x, t, y, torch.zeros(4)), student.net(x, t, y, torch.full((4,), 4.0)))
    # Guidance does what it is for: the share of samples in the mode of the class they ask for (toy2d's 8 modes sit
    # at angles k pi/4) rises with w for the CFG teacher, and the 2-step guided student follows the class at w = 4.
    # (After 50 updates its w-embedding has barely moved from zero: at w = 0 it still acts as the conditional net.)
    from fastdiff.guidance import conditional, guided
    from fastdiff.samplers import make_grid, sample

    teacher_model = load_model(tmp_path / "teacher")
    y = torch.arange(400) % 8

    def mode_accuracy(model, param, n_steps, w=None):
        x = sample(model, 400, (2,), make_grid("student", n_steps, teacher_model.schedule),
                   schedule=teacher_model.schedule, param=param, seed=1, device="cpu", clip=False, guidance=w)
        mode = torch.round(torch.atan2(x[:, 1], x[:, 0]) / (torch.pi / 4)).long() % 8
        return float((mode == y).float().mean())

    cfg_teacher = guided(teacher_model.net, y, 8)
    acc_teacher = [mode_accuracy(cfg_teacher, teacher_model.param, 16, w) for w in (0.0, 4.0)]
    acc_student = mode_accuracy(conditional(student.net, y, torch.full((400,), 4.0)), student.param, 2)
    assert acc_teacher[0] < 0.3 < 0.8 < acc_teacher[1] and acc_student > 0.8, (acc_teacher, acc_student)
    # The guided sweep: DDIM on the CFG teacher and the w-conditioned students, over w; then its report section.
    from fastdiff.bench import BenchConfig, run_sweep
    from fastdiff.report import write_report
    from fastdiff.results import ResultsCSV

    bench = BenchConfig(distill_dir=str(run), samplers=("ddim", "distilled"), spacings=("linspace",), steps=(2,),
                        n_samples=64, batch_size=32, guidance=(0.0, 2.0), metrics=("fid",), clip=False,
                        out_dir=str(tmp_path / "results"), name="toy-guided", device="cpu")
    csv_path = run_sweep(bench, progress=False)
    got = {(r["sampler"], r["steps"], r["guidance"]) for r in ResultsCSV(csv_path).rows}
    assert got == {("ddim", "2", "0.0"), ("ddim", "2", "2.0"), ("distilled", "2", "0.0"), ("distilled", "2", "2.0")}
    report = write_report(tmp_path / "results").read_text()
    assert "guidance_tradeoff" in report and (csv_path.parent / "guidance_tradeoff.png").exists()


def test_class_accuracy_of_real_digits():
    from fastdiff.data import get_data
    from fastdiff.metrics import class_accuracy

    test = get_data("digits", "test")
    assert class_accuracy(test.x, test.y, "digits") > 0.9
    assert class_accuracy(test.x, (test.y + 1) % 10, "digits") < 0.2
