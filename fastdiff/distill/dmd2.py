"""Distribution-matching distillation as a method: DMD2 (Yin et al. 2024, "Improved Distribution Matching
Distillation for Fast Image Synthesis"; DMD: Yin et al. 2023).

A generator G, initialised from the teacher, maps noise to x0 in N steps (N = 1: one prediction at t = 1). Its loss is
the distribution-matching gradient: for a generator sample x, noised to x_t at t ~ U[t_min, t_max], the direction
(x0^_fake(x_t) - x0^_real(x_t)) / mean|x - x0^_real(x_t)| (per example; DMD Eq. 8 with its normaliser), applied
through the stop-gradient surrogate 0.5 ||x - sg(x - direction)||^2 (DMD2's `compute_distribution_matching_loss`).
x0^_real is the frozen teacher (under guidance: the CFG teacher at one weight w, fixed per run); x0^_fake is a
fake-score network, initialised from the teacher and trained by the teacher's own denoising loss on the generator's
detached samples, `fake_updates` times per generator update (DMD2's two time-scale update rule, Sec. 4.1). No
regression loss (DMD2 drops it). An N-step generator is trained with backward simulation (Sec. 4.3): its input at
grid time t_k is its own k-step sample, re-noised; it is sampled by `fastdiff.samplers.renoising` on the grid
`student{N}` (t = 1, (N-1)/N, ..., 1/N; fewer steps: a subset of those times).

Students: students/dmd2.pt (sampler `dmd2`), snapshots students/dmd2_u{updates}.pt at the forward-equivalents of
every PD student (equal cost). Cost of one update, per example: see `DMD2.update_cost`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from fastdiff import config as cfgs
from fastdiff.distill.protocol import (FORWARD, TRAINED, Method, evaluate_student, forward_equivalents, get_method,
                                       register_method, resume_state, save_student, student_cost)
from fastdiff.errors import FastdiffError
from fastdiff.losses import T_MIN, noised

if TYPE_CHECKING:
    from fastdiff.distill.config import DistillConfig
    from fastdiff.distill.stages import DistillRun

EVAL_NFE = (1, 2, 4)


@dataclass(frozen=True)
class DMD2Options:
    """DMD2's options: `DistillConfig.dmd2`, `--dmd2.<field>`."""

    updates: int = 0  # generator updates (0: as many forward-equivalents as the PD rounds' total: equal cost)
    steps: int = 1  # N: the generator's sampling steps (1: one prediction from pure noise; >1: backward simulation)
    fake_updates: int = 5  # fake-score updates per generator update (DMD2's two time-scale rule)
    t_min: float = 0.02  # distribution-matching times t ~ U[t_min, t_max] (DMD's 20/1000 .. 980/1000)
    t_max: float = 0.98  # see t_min
    lr: float = 0.0  # Adam learning rate of the generator and the fake score (0: the run's --lr)
    ema_decay: float = 0.99  # EMA of the generator that is saved and evaluated (0: the raw weights)
    grad_clip: float = 10.0  # gradient-norm clip of both networks (DMD2's max_grad_norm; 0: none)
    guidance: float = 2.0  # guided teachers: the CFG weight w of the real score (fastdiff's w: 1 is conditional)
    gan: bool = False  # DMD2's GAN head on the fake score's bottleneck (Sec. 4.2): real data vs generator samples
    gan_generator_weight: float = 3e-3  # weight of the non-saturating GAN loss in the generator's loss (DMD2 ImageNet)
    gan_classifier_weight: float = 1e-2  # weight of the head's classification loss in the fake score's loss
    eval_every: int = 0  # updates between extra student snapshots (besides the PD students' costs and the end)


# --- the maths --------------------------------------------------------------------------------------------------


def dm_direction(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """(B, ...) the distribution-matching direction (x0^_fake - x0^_real) / mean|x - x0^_real|, the mean per example
    over its elements (DMD Eq. 8's normaliser; DMD2 `grad = (p_real - p_fake) / |p_real|.mean()` with p = x - x0^);
    non-finite entries are 0 (as DMD2's nan_to_num)."""
    dims = tuple(range(1, x.ndim))
    return torch.nan_to_num((x0_fake - x0_real) / (x - x0_real).abs().mean(dims, keepdim=True))


def dm_loss(x: torch.Tensor, t: torch.Tensor, real: Callable, fake: Callable, schedule, gen: torch.Generator):
    """The surrogate whose gradient in x is the distribution-matching direction (over x.numel()): 0.5 mean (x -
    sg(x - d))^2 with d = dm_direction at x_t = alpha_t x + sigma_t eps; `real`/`fake` (x_t, t) -> x0^ (no gradient
    flows through them); t (B,) float64."""
    x_t, _, _, _ = noised(x.detach(), t, schedule, gen)
    with torch.no_grad():
        direction = dm_direction(x.detach(), real(x_t, t), fake(x_t, t))
    return 0.5 * (x - (x - direction).detach()).pow(2).mean()


def fake_score_loss(fake_net, x: torch.Tensor, schedule, param: str, weighting: str, gen: torch.Generator,
                    y=None) -> torch.Tensor:
    """The fake score's denoising loss on generator samples `x` (detached): the teacher's own loss (its param and
    weighting) at t ~ U[T_MIN, 1]."""
    from fastdiff.losses import diffusion_loss

    return diffusion_loss(fake_net, x.detach(), schedule, param, weighting, gen, y=y).mean()


class GANHead(torch.nn.Module):
    """DMD2's GAN classifier (Sec. 4.2) on a feature map (B, C, h, w) -> (B,) realism logits: conv 3x3, GroupNorm,
    SiLU, the spatial mean, a linear layer (DMD2's head is convolutions down to 1x1; this one takes any h, w)."""

    def __init__(self, channels: int):
        super().__init__()
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, padding=1),
                                        torch.nn.GroupNorm(groups, channels), torch.nn.SiLU())
        self.out = torch.nn.Linear(channels, 1)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(feat).mean((2, 3))).squeeze(1)


def bottleneck(net: torch.nn.Module) -> torch.nn.Module:
    """The module whose output is `net`'s bottleneck feature map: fastdiff's U-Net's last middle block, a diffusers
    UNet2DModel's mid_block; FastdiffError for a network without one."""
    if hasattr(net, "mid"):
        return net.mid[-1]
    unet = getattr(net, "unet", None)
    if unet is not None and getattr(unet, "mid_block", None) is not None:
        return unet.mid_block
    raise FastdiffError(f"--dmd2.gan needs a U-Net with a bottleneck (fastdiff's UNet or a diffusers UNet2DModel), "
                        f"not a {type(net).__name__}")


class FakeScore(torch.nn.Module):
    """The fake-score network with DMD2's GAN head: forward(x, t) is the network's; forward(x, t, logits=True) the
    head's realism logits of x from the network's bottleneck at (x, t) (one forward of the network)."""

    def __init__(self, net: torch.nn.Module, data_shape):
        super().__init__()
        self.net, self._feat = net, []
        bottleneck(net).register_forward_hook(lambda _m, _i, out: self._feat.append(out))
        with torch.no_grad():
            net(torch.zeros(1, *data_shape, device=next(net.parameters()).device),
                torch.full((1,), 0.5, device=next(net.parameters()).device))
        self.head = GANHead(self._feat.pop().shape[1]).to(next(net.parameters()).device)

    def forward(self, x, t, y=None, logits: bool = False):
        out = self.net(x, t) if y is None else self.net(x, t, y)
        feat = self._feat.pop()
        return self.head(feat) if logits else out


def generate(gen_x0: Callable, z: torch.Tensor, ts: torch.Tensor, k: int, schedule, gen: torch.Generator,
             clip: bool) -> torch.Tensor:
    """A generator's input at grid time ts[k] by backward simulation (DMD2 Sec. 4.3): from z at ts[0], k steps of
    its own re-noising sampler without gradients (fresh noise from `gen`); k = 0: z itself. gen_x0(x, t) -> x0^."""
    x = z
    with torch.no_grad():
        for i in range(k):
            t = torch.full((z.shape[0],), float(ts[i]), dtype=torch.float64)
            x0 = gen_x0(x, t)
            x0 = x0.clamp(-1.0, 1.0) if clip else x0
            alpha, sigma = (float(v) for v in schedule.alpha_sigma(float(ts[i + 1])))
            x = alpha * x0 + sigma * torch.randn(x0.shape, generator=gen).to(x0)
    return x


def sample_student(net, x, ts, **kw):
    """A DMD2 student's sampler: x0, then re-noise to each later time of its grid student{N}."""
    from fastdiff.samplers import renoising

    return renoising(net, x, ts, **kw)


# --- the method ---------------------------------------------------------------------------------------------------


class DMD2(Method):
    name = "dmd2"
    title = "distribution-matching distillation, DMD2 (Yin et al. 2024)"
    samplers = ("dmd2",)
    options = DMD2Options
    uses = ("pd",)  # equal cost: as many forward-equivalents as the PD rounds, snapshots at each PD student's
    label, short = "distribution matching", "DMD2"

    def validate(self, cfg: DistillConfig) -> None:
        o = cfg.dmd2
        if cfg.param == "eps":
            raise FastdiffError("--method dmd2 needs --param v or x0: an eps generator's x0 = (z - sigma eps)/alpha "
                                "divides by alpha ~ 0 at t = 1")
        if cfg.guided and cfg.bench:
            raise FastdiffError("--method dmd2 --guided: the guided sweep of a DMD2 student (no w input; distilled at "
                                "--dmd2.guidance) is not implemented yet; pass --bench false")
        cfgs.check_range(cfg, "dmd2.updates", o.updates >= 0, ">= 0 (0: the PD rounds' forward-equivalents)")
        cfgs.check_range(cfg, "dmd2.steps", o.steps >= 1, ">= 1")
        cfgs.check_range(cfg, "dmd2.fake_updates", o.fake_updates >= 1, ">= 1")
        cfgs.check_range(cfg, "dmd2.t_min", 0 < o.t_min < 1, "in (0, 1)")
        cfgs.check_range(cfg, "dmd2.t_max", o.t_min < o.t_max <= 1, f"in ({o.t_min}, 1] (above --dmd2.t-min)")
        cfgs.check_range(cfg, "dmd2.lr", o.lr >= 0, ">= 0 (0: --lr)")
        cfgs.check_range(cfg, "dmd2.ema_decay", 0 <= o.ema_decay < 1, "in [0, 1)")
        cfgs.check_range(cfg, "dmd2.grad_clip", o.grad_clip >= 0, ">= 0 (0: none)")
        cfgs.check_range(cfg, "dmd2.eval_every", o.eval_every >= 0, ">= 0 (0: at the PD students' costs and the end)")
        cfgs.check_range(cfg, "dmd2.guidance", o.guidance >= 0, ">= 0 (fastdiff's w: 0 unconditional, 1 conditional)")
        get_method("pd").validate(cfg)  # its budgets are DMD2's equal-cost points

    def check_teacher(self, teacher, cfg: DistillConfig) -> None:
        if cfg.dmd2.gan:
            bottleneck(teacher.net)  # the GAN head needs one

    def update_cost(self, cfg: DistillConfig) -> dict[str, float]:
        """Per generator update and example: `fake_updates` fake-score steps, each on fresh generator samples (a
        generator forward, plus (N-1)/2 on average for backward simulation) and a fake-score forward + backward;
        then the generator step: its forward + backward (and the simulation's forwards), one teacher evaluation and
        one fake-score evaluation at the noised sample (the teacher guided: two evaluations). With the GAN head: the fake network's forward + backward on a
        real and a generated batch in each fake-score step, and on the generated one in the generator step."""
        o, b = cfg.dmd2, cfg.batch_size
        sim = (o.steps - 1) / 2  # expected forwards of the backward simulation (k ~ U{0..N-1})
        gan = TRAINED if o.gan else 0  # per pass of the GAN head: the fake network's forward + backward
        return {"teacher": FORWARD * b * (2 if cfg.guided else 1),  # guided: its conditional and unconditional halves
                "generator": (o.fake_updates * (FORWARD + sim) + sim + TRAINED) * b,
                "fake_score": (o.fake_updates * (TRAINED + 2 * gan) + FORWARD + gan) * b}

    def total(self, cfg: DistillConfig) -> int:
        """--dmd2.updates, or (0) the updates whose forward-equivalents equal the PD rounds' total."""
        return cfg.dmd2.updates or self._at_cost(cfg, get_method("pd").budgets(cfg)[-1])

    def _at_cost(self, cfg: DistillConfig, pd_updates: int) -> int:
        pd = get_method("pd")
        per = forward_equivalents(self.update_cost(cfg), 1)
        return max(1, round(forward_equivalents(pd.update_cost(cfg), pd_updates) / per))

    def budgets(self, cfg: DistillConfig) -> list[int]:
        """The updates at which it saves a student: at each PD student's forward-equivalents, every
        --dmd2.eval-every updates, and the last one."""
        total, every = self.total(cfg), cfg.dmd2.eval_every
        at_pd = {self._at_cost(cfg, u) for u in get_method("pd").budgets(cfg)}
        return sorted({u for u in at_pd | set(range(every, total, every) if every else ()) if u < total} | {total})

    def plan(self, cfg: DistillConfig) -> list[str]:
        o = cfg.dmd2
        return [f"DMD2: {self.total(cfg)} generator updates of a {o.steps}-step generator, {o.fake_updates} "
                f"fake-score updates each (t ~ U[{o.t_min:g}, {o.t_max:g}]; students at updates "
                f"{', '.join(map(str, self.budgets(cfg)))})"]

    def run(self, ctx: DistillRun) -> None:
        run_dmd2(ctx, self)


register_method(DMD2())


def snapshot_path(run, updates: int):
    return run / "students" / f"dmd2_u{updates:06d}.pt"


def run_dmd2(ctx: DistillRun, method: DMD2) -> None:
    """Train (or resume) the generator and the fake score through runs.fit; save the generator's EMA with its own
    evaluation at each of `method.budgets` (students/dmd2_u{updates}.pt) and at the end (students/dmd2.pt)."""
    import copy
    import time

    from fastdiff import distributed as dist
    from fastdiff import runs
    from fastdiff.grids import make_grid
    from fastdiff.guidance import conditional, guided_x0_eps
    from fastdiff.models import build_model, network_from_dict
    from fastdiff.param import denoiser

    cfg, o, device, schedule = ctx.cfg, ctx.cfg.dmd2, ctx.device, ctx.schedule
    total, snapshots, n = method.total(cfg), set(method.budgets(cfg)), o.steps
    final, grid = ctx.run / "students" / "dmd2.pt", f"student{n}"
    if final.exists():
        return
    teacher = ctx.teacher0.net.eval().requires_grad_(False)
    # the teacher's network (conditional like it, no w input even in a guided run: w is fixed, --dmd2.guidance)
    network = {**ctx.teacher0.network, "scalar_cond": False}
    generator = build_model(network_from_dict(network)).to(device)
    generator.load_state_dict(teacher.state_dict())
    fake = build_model(network_from_dict(ctx.teacher0.network)).to(device)
    fake.load_state_dict(teacher.state_dict())
    if o.gan:
        fake = FakeScore(fake, ctx.teacher0.data_shape)
    ema = copy.deepcopy(generator)
    guided = cfg.guided
    ts = make_grid("student", n, schedule)
    lr = o.lr or cfg.lr
    salt = cfg.seed * 7919 + 4242
    gen = torch.Generator().manual_seed(salt + dist.rank())
    torch.manual_seed(salt + 1 + dist.rank())
    local_batch = dist.local_batch_size(cfg.batch_size)
    shape = tuple(ctx.teacher0.data_shape)
    resume = resume_state(ctx, "dmd2")
    timing = {"start": time.perf_counter() - (resume["wall_clock_s"] if resume else 0.0),
              "eval_s": resume.get("eval_s", 0.0) if resume else 0.0}

    def condition() -> torch.Tensor | None:
        """A guided run's batch of conditions: the labels of random training examples (a text teacher: a random
        caption of each), as the teacher saw them; None unguided."""
        if not guided:
            return None
        idx = torch.randint(len(ctx.x_all), (local_batch,), generator=gen).to(device)
        return ctx.conditioner(ctx.y_all[idx], gen)

    def on(net, y):
        return net if y is None else conditional(net, y)

    def samples(model, grad: bool, y) -> torch.Tensor:
        """A batch of the generator's x0 at a grid time drawn per batch, its input by backward simulation."""
        g_x0 = denoiser(on(model, y), schedule, cfg.param)
        z = torch.randn((local_batch, *shape), generator=gen).to(device)
        k = int(torch.randint(n, (1,), generator=gen)) if n > 1 else 0
        x = generate(lambda x_, t_: g_x0(x_, t_)[0], z, ts, k, schedule, gen, ctx.clip)
        t = torch.full((local_batch,), float(ts[k]), dtype=torch.float64)
        with torch.set_grad_enabled(grad):
            return g_x0(x, t)[0]

    t_clean = torch.full((local_batch,), T_MIN, device=device)  # where the GAN head sees its images (DMD2: sigma_min)

    def fake_loss(model) -> torch.Tensor:
        y = condition()
        x = samples(generator, grad=False, y=y)
        loss = fake_score_loss(model, x, schedule, ctx.teacher0.param, ctx.tcfg.weighting, gen, y=y)
        if o.gan:  # the head's non-saturating classification: data real, generator samples fake
            idx = torch.randint(len(ctx.x_all), (local_batch,), generator=gen).to(device)
            real = ctx.x_all[idx]
            real_y = None if y is None else ctx.conditioner(ctx.y_all[idx], gen)
            logits_real = model(real, t_clean, real_y, logits=True)
            logits_fake = model(x.detach(), t_clean, y, logits=True)
            loss = loss + o.gan_classifier_weight * (F.softplus(logits_fake) + F.softplus(-logits_real)).mean()
        return loss

    def generator_loss(model) -> torch.Tensor:
        y = condition()
        x = samples(model, grad=True, y=y)
        t = o.t_min + (o.t_max - o.t_min) * torch.rand(local_batch, generator=gen, dtype=torch.float64)
        if guided:  # the real score: the CFG teacher at w = --dmd2.guidance for the batch's conditions
            w = torch.full((local_batch,), o.guidance, device=device)
            real_x0 = guided_x0_eps(teacher, ctx.teacher0.param, schedule, y, w, ctx.num_classes)
        else:
            real_x0 = denoiser(teacher, schedule, ctx.teacher0.param)
        fake_x0 = denoiser(on(fake, y), schedule, ctx.teacher0.param)
        real = lambda x_t, t_: real_x0(x_t, t_)[0]  # noqa: E731
        fake_fn = lambda x_t, t_: fake_x0(x_t, t_)[0]  # noqa: E731
        loss = dm_loss(x, t, real, fake_fn, schedule, gen)
        if o.gan:  # (its gradient in the fake network's weights is cleared before the next fake-score step)
            loss = loss + o.gan_generator_weight * F.softplus(-fake(x, t_clean, y, logits=True)).mean()
        return loss

    def snapshot(update: int) -> None:
        """students/dmd2_u{update}.pt (and dmd2.pt at the end) with the EMA's own evaluation; rank 0. The
        evaluation's time is not training cost."""
        t_eval = time.perf_counter()
        cost = student_cost(ctx, method, update, t_eval - timing["start"] - timing["eval_s"])
        evaluation = [evaluate_student(ctx, ema, "dmd2", grid, nfe, guidance=o.guidance if guided else None)
                      for nfe in EVAL_NFE if nfe <= n]
        for path, swept in ((snapshot_path(ctx.run, update), False),) + (((final, True),) if update == total else ()):
            save_student(ctx, path, ema, method=method, sampler="dmd2", grid=grid, steps=n, cost=cost,
                         evaluation=evaluation, swept=swept,
                         extra={"updates": update, "dmd2": cfgs.to_dict(o), "network": network,
                                "config": {**ctx.student_cfg, "scalar_cond": False},
                                **({"guidance": o.guidance} if guided else {})})
        timing["eval_s"] += time.perf_counter() - t_eval

    def after_update(update, loss, lr_now, grad_norm) -> None:
        if dist.is_main() and update in snapshots:
            snapshot(update)

    clip = o.grad_clip or None
    nets = {"fake_score": runs.Trained(fake, torch.optim.Adam(fake.parameters(), lr=lr), fake_loss,
                                       steps=o.fake_updates, grad_clip=clip),
            "generator": runs.Trained(generator, torch.optim.Adam(generator.parameters(), lr=lr), generator_loss,
                                      grad_clip=clip)}
    generator.train().requires_grad_(True)
    fake.train().requires_grad_(True)
    runs.fit(nets, total=total, lr_at=lambda update: lr, gen=gen, salt=salt, device=device,
             state_path=ctx.state_path, ckpt_every=cfg.ckpt_every, label="DMD2", resume=resume,
             emas={"ema": ("generator", o.ema_decay, ema)}, after_update=after_update,
             extra_state=lambda: {"kind": "distill-state", "config": {**ctx.student_cfg, "scalar_cond": False},
                                  "stage": "dmd2", "network": network, "eval_s": timing["eval_s"]},
             on_step=None if ctx.on_step is None else lambda update: ctx.on_step(0, update),
             progress=ctx.progress)
    if dist.is_main() and not final.exists():  # a run stopped after its last update, before the snapshot
        snapshot(total)
    dist.barrier()
