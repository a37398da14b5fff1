"""The personalisation and control demonstration on digits-text: `python -m fastdiff.personalize_demo --teacher
runs/teacher-digits-text --student runs/distill-digits-text/students/student_N4.pt --results-dir results`.

Writes `<results-dir>/personalize/`: `metrics.json` (every number below, with provenance), `loss_vs_iterations.csv`
(noise optimisation) and picture grids, one per demonstration:

1. textual inversion and 2. DreamBooth on two subjects no prompt of the base model gives: 20 mirrored training sevens,
   and the 20 training sevens with the most ink (the captions' adjectives are distractors, so "bold" does not ask
   for it): digit accuracy of the samples after undoing the style (mirrored back: the classifier must read 7), their
   mean ink, and the cosine distance of their mean classifier feature to the subject images', against the base
   model's "a seven"; DreamBooth's prior preservation: "a seven" and the held-out prompts of every digit, before and
   after.
1b. textual inversion where the base model has the pieces but no prompt gives the subject (`inversion_demo`): sevens
   on a teacher whose sevens no word names (`--unnamed-teacher`, digits-text-unnamed7), and inverted sevens on a
   teacher that learned "dark" on every other digit (`--dark-teacher`, digits-text-dark): the subject rate of all
   32 prompts its vocabulary can write for it and of its unconditional samples, against prompts with the learned
   word (free and held-out templates), the feature distance to the subject, and that other prompts are unchanged.
3. noise optimisation towards a digit (the classifier's −log p) through the teacher's DDIM at 32 and 8 steps and
   through the 4-step student: loss after each iteration and seconds per iteration per image.
4. prompt-to-prompt word swap ("a bold seven" -> "a bold one") at τ = 0, 0.25, 0.5, 1 on the teacher (DDIM 16 steps)
   and the student (4 steps): how much of the source is kept (mean |edit − source| against the target's own image)
   and the target digit's accuracy; attention re-weighting of "seven" and of "bold" (accuracy as 7, ink).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from fastdiff.errors import FastdiffError, run_cli

log = logging.getLogger(__name__)

W = 2.0  # the guidance weight of every sample here
N = 64  # samples per condition


def _sampler(model, steps: int, prompts: list[str], w: float = W, net=None):
    """(x_T -> x_0) of `model` (its network, or `net`: the same one under a controller) on `prompts` (one per row): a
    teacher by DDIM with CFG on `steps` steps, a guided student on its own grid with its w input. Differentiable."""
    from fastdiff.guidance import conditional, guided
    from fastdiff.samplers import ddim, make_grid, student_grid

    y, net = model.net.text.tokenize(prompts), net or model.net
    if model.kind == "student":
        net, g, ts = conditional(net, y, torch.full((len(prompts),), w)), None, student_grid(model.steps)
    else:
        net, g, ts = guided(net, y, 0), w, make_grid("student", steps, model.schedule)
    return lambda x: ddim(net, x, ts, schedule=model.schedule, param=model.param, clip=model.clip, guidance=g).x


def _sample(model, steps: int, prompts: list[str], seed: int = 0, w: float = W) -> torch.Tensor:
    from fastdiff.samplers import initial_noise

    x, _ = initial_noise(range(len(prompts)), model.data_shape, seed, "cpu")
    with torch.no_grad():
        return _sampler(model, steps, prompts, w)(x)


def _accuracy(x: torch.Tensor, digit: int) -> float:
    from fastdiff.metrics import class_accuracy

    return class_accuracy(x, torch.full((len(x),), digit), "digits")


def _feature_distance(x: torch.Tensor, ref: torch.Tensor) -> float:
    """1 − cos between the mean classifier features of x and of ref."""
    from fastdiff.features import classifier_weights, load_classifier

    net = load_classifier(classifier_weights("digits")[0])
    with torch.no_grad():
        a, b = net(x.clamp(-1, 1))[0].mean(0), net(ref.clamp(-1, 1))[0].mean(0)
    return float(1 - torch.nn.functional.cosine_similarity(a, b, dim=0))


def _grid(path: Path, rows: list[tuple[str, torch.Tensor]], n: int = 8) -> None:
    """A picture grid: one labelled row of n images per entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastdiff.data import to_uint8

    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.8, len(rows) * 0.9), squeeze=False)
    for r, (label, x) in enumerate(rows):
        imgs = to_uint8(x[:n]).numpy()
        for c in range(n):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(imgs):
                ax.imshow(imgs[c, 0], cmap="gray", vmin=0, vmax=255)
        axes[r][0].set_title(label, fontsize=7, loc="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _training_seconds(run: Path) -> float:
    """The wall-clock its personalisation run recorded (`personalized.json`): a finished run found in the work dir
    is reused, so the time of this process would say nothing."""
    return json.loads((Path(run) / "personalized.json").read_text())["wall_clock_s"]


def _ink(x: torch.Tensor) -> float:
    """Mean pixel value in [0, 1] (0 black): how heavy the strokes are."""
    return float(((x.clamp(-1, 1) + 1) / 2).mean())


def personalisation(teacher_path: str, out: Path, work: Path, updates: int) -> dict:
    """Demonstrations 1 and 2 (module docstring), on two subjects: mirrored sevens and the heaviest sevens."""
    from fastdiff.checkpoint import load_model
    from fastdiff.metrics import class_accuracy
    from fastdiff.personalize import PersonalizeConfig, personalize, subject_images
    from fastdiff.text import eval_prompt

    teacher = load_model(teacher_path)
    base = _sample(teacher, 32, ["a seven"] * N)
    eval_prompts = [eval_prompt(k)[0] for k in range(200)]
    digits = torch.tensor([eval_prompt(k)[1] for k in range(200)])

    def prompt_accuracy(model) -> float:
        return class_accuracy(_sample(model, 32, eval_prompts), digits, "digits")

    def scores(x, subject, undo) -> dict:
        return {"accuracy_7_style_undone": _accuracy(undo(x), 7), "accuracy_7": _accuracy(x, 7), "ink": _ink(x),
                "feature_distance_to_subject": _feature_distance(x, subject)}

    results = {"base_prompt_accuracy": prompt_accuracy(teacher)}
    rows = [("base teacher: 'a seven'", base)]
    runs = (("mirror", "textual-inversion", "<s*>", "a picture of a <s*>"), ("mirror", "dreambooth", "<v>", "a <v> seven"),
            ("heavy", "textual-inversion", "<s*>", "a picture of a <s*>"), ("heavy", "dreambooth", "<v>", "a <v> seven"))
    for style, method, token, prompt in runs:
        subject = subject_images("digits:7:20", style)
        undo = (lambda z: z.flip(-1)) if style == "mirror" else (lambda z: z)
        entry = results.setdefault(style, {"subject": {"images": "digits:7:20", "n": len(subject),
                                                       "ink": _ink(subject)},
                                           "base_a_seven": scores(base, subject, undo)})
        if method == "textual-inversion":
            rows.append((f"subject ({style}): 20 training sevens", subject))
        run = personalize(PersonalizeConfig(model=teacher_path, method=method, token=token, updates=updates,
                                            images="digits:7:20", style=style, out_dir=str(work / f"{method}-{style}")),
                          progress=False)
        model = load_model(run)
        x = _sample(model, 32, [prompt] * N)
        entry[method] = {"prompt": prompt, "updates": updates, "seconds": _training_seconds(run),
                         "model_hash": model.hash, **scores(x, subject, undo)}
        rows.append((f"{method} ({style}): '{prompt}'", x))
        if method == "textual-inversion":
            from fastdiff.features import classifier_weights, load_classifier

            with torch.no_grad():
                read = load_classifier(classifier_weights("digits")[0])(undo(x))[1].argmax(1)
            entry[method]["digits_read"] = {str(d): int((read == d).sum()) for d in range(10) if (read == d).any()}
        if method == "dreambooth":  # prior preservation: the class prompt and every digit's prompts, before/after
            plain = _sample(model, 32, ["a seven"] * N)
            entry[method].update(a_seven_accuracy_7_before=_accuracy(base, 7), a_seven_accuracy_7_after=_accuracy(plain, 7),
                                 a_seven_after=scores(plain, subject, undo),
                                 prompt_accuracy_before=results["base_prompt_accuracy"],
                                 prompt_accuracy_after=prompt_accuracy(model))
            rows.append((f"dreambooth ({style}) teacher: 'a seven' (prior preservation)", plain))
    _grid(out / "personalisation.png", rows)
    return results


def _styled_rate(x: torch.Tensor, digit: int, style: str) -> dict:
    """How many samples are the subject: read as `digit` ("none"), or contrast-inverted (light background: mean
    pixel > 0) and read as `digit` once inverted back ("invert")."""
    if style == "none":
        return {"subject_rate": _accuracy(x, digit)}
    inverted = x.flatten(1).mean(1) > 0
    undone = torch.where(inverted[:, None, None, None], -x, x)
    from fastdiff.features import classifier_weights, load_classifier

    with torch.no_grad():
        read = load_classifier(classifier_weights("digits")[0])(undone.clamp(-1, 1))[1].argmax(1) == digit
    return {"subject_rate": float((inverted & read).float().mean()), "inverted": float(inverted.float().mean()),
            f"read_as_{digit}_once_undone": float(read.float().mean())}


def erase_words(teacher_path: str, words: tuple[str, ...], out_dir: Path, seed: int = 0) -> tuple[str, dict]:
    """-> (a copy of the text teacher at `teacher_path` whose word-encoder rows of `words` are replaced by fresh
    N(0, 1) draws, as if never trained (its weights and EMA weights; saved as `out_dir`/checkpoint.pt), {word:
    its original (D,) row} for every digit word and numeral). The network still draws what those words asked for;
    no prompt can reach it any more: textual inversion's premise, built exactly."""
    from fastdiff.checkpoint import CKPT_NAME, save_checkpoint
    from fastdiff.text import NUMBER_WORDS, NUMERALS, VOCAB

    ckpt = torch.load(Path(teacher_path) / CKPT_NAME if Path(teacher_path).is_dir() else teacher_path,
                      map_location="cpu", weights_only=True)
    key = "text.encoder.token.weight"
    original = {w: ckpt["ema"][key][VOCAB.index(w)].clone() for w in NUMBER_WORDS + NUMERALS}
    gen = torch.Generator().manual_seed(seed)
    fresh = torch.randn(len(words), ckpt["ema"][key].shape[1], generator=gen)
    for weights in ("ema", "model"):
        table = ckpt[weights][key].clone()
        table[[VOCAB.index(w) for w in words]] = fresh
        ckpt[weights][key] = table
    keep = ("kind", "config", "param", "network", "data_shape", "ema", "model", "step", "schedule", "cost")
    save_checkpoint(out_dir / CKPT_NAME, {k: v for k, v in ckpt.items() if k in keep})
    return str(out_dir / CKPT_NAME), original


def inversion_demo(teacher_path: str, style: str, out: Path, work: Path, updates: int,
                   truth: dict | None = None, name: str = "") -> dict:
    """Demonstration 1b: textual inversion where the base model has the pieces but no prompt gives the subject:
    style "none" on the digits-text-unnamed7 teacher (its sevens trained only the null condition: no word names
    them), style "invert" on the digits-text-dark teacher (it learned "dark" on every digit but 7: no dark seven
    was ever seen), or a teacher whose words for 7 were erased (`erase_words`; `truth`: the erased rows, to which
    the learned vector's cosine is reported). The subject rate (`_styled_rate`) of every prompt the base vocabulary can write for it (the
    digit's numeral and word in every template; the adjective slot says "dark" for the inverted subject) and of
    unconditional samples, against prompts with the learned word (free, and held-out templates)."""
    from fastdiff.checkpoint import load_model
    from fastdiff.personalize import PersonalizeConfig, personalize, subject_images
    from fastdiff.text import ADJECTIVES, DARK, HELDOUT_TEMPLATES, NUMBER_WORDS, TRAIN_TEMPLATES

    teacher = load_model(teacher_path)
    subject = subject_images("digits:7:20", style)
    rate = functools.partial(_styled_rate, digit=7, style=style)
    adjective = (lambda i: DARK) if style == "invert" else (lambda i: ADJECTIVES[i % len(ADJECTIVES)])
    base_prompts = [t.format(n=n, a=adjective(i)) for i, t in enumerate(TRAIN_TEMPLATES + HELDOUT_TEMPLATES)
                    for n in ("7", "seven")]
    base = {p: rate(_sample(teacher, 32, [p] * N))["subject_rate"] for p in base_prompts}
    best = max(base, key=base.get)
    uncond = _sample(teacher, 32, ["a seven"] * N, w=0.0)  # w = 0: the null condition alone
    run = personalize(PersonalizeConfig(model=teacher_path, method="textual-inversion", token="<s*>", updates=updates,
                                        images="digits:7:20", style=style,
                                        out_dir=str(work / f"textual-inversion-{name or Path(teacher_path).name}")),
                      progress=False)
    model = load_model(run)
    seconds = _training_seconds(run)
    learned = {p: _sample(model, 32, [p] * N) for p in ("a picture of a <s*>", "a handwritten <s*>")}
    heldout = [t.format(n="<s*>") for t in HELDOUT_TEMPLATES if "{a}" not in t]
    heldout_x = _sample(model, 32, [heldout[k % len(heldout)] for k in range(N)])
    others = [f"a handwritten {w}" for w in NUMBER_WORDS if w != "seven"][:3]
    same = all(torch.equal(_sample(teacher, 32, [p] * 8), _sample(model, 32, [p] * 8)) for p in others)
    undo = (lambda z: z) if style == "none" else (lambda z: -z)
    rows = [("subject: 20 training sevens" + (", inverted" if style == "invert" else ""), subject),
            (f"base teacher, best prompt: '{best}'", _sample(teacher, 32, [best] * N)),
            ("base teacher, unconditional (w = 0)", uncond)]
    result = {"teacher": teacher_path, "teacher_hash": teacher.hash, "style": style, "model_hash": model.hash,
              "updates": updates, "seconds": seconds, "subject": {"images": "digits:7:20", "n": len(subject)}, "samples": N,
              "base_prompts": len(base_prompts), "base_best_prompt": best, "base_best_rate": base[best],
              "base_mean_rate": sum(base.values()) / len(base), "unconditional": rate(uncond),
              "learned": {}, "other_prompts_unchanged": same}
    for p, x in list(learned.items()) + [(" / ".join(heldout), heldout_x)]:
        result["learned"][p] = {**rate(x), "feature_distance_to_subject": _feature_distance(undo(x), undo(subject))}
        rows.append((f"textual inversion: '{p}'" if p in learned else "textual inversion, held-out templates", x))
    if truth:  # where the learned vector lies among the original rows of the digit words and numerals
        learned_row = model.net.text.encoder.extra[-1].detach()
        cos = {w: float(torch.nn.functional.cosine_similarity(learned_row, v, dim=0)) for w, v in truth.items()}
        result["cosine_to_original_rows"] = dict(sorted(cos.items(), key=lambda kv: -kv[1]))
        start = teacher.net.text.encoder.token.weight[teacher.net.text.encoder.tokenize.ids["seven"]].detach()  # init
        result["cosine_of_start_to_original_rows"] = {
            w: float(torch.nn.functional.cosine_similarity(start, truth[w], dim=0)) for w in ("seven", "7")}
    if style == "invert":  # the word does mean something on the digits it was trained on
        dark3 = _sample(teacher, 32, ["a dark three"] * N)
        result["control_a_dark_three"] = _styled_rate(dark3, 3, "invert")
        rows.append(("base teacher: 'a dark three' (trained)", dark3))
    _grid(out / f"textual_inversion_{name or style}.png", rows)
    return result


def noise_optimisation(teacher_path: str, student_path: str, out: Path, iterations: int) -> tuple[dict, str]:
    """Demonstration 3: push 'the digit 8' samples towards the classifier's 3 through each sampler."""
    from fastdiff.checkpoint import load_model
    from fastdiff.noiseopt import ClassifierLoss, optimize_noise
    from fastdiff.samplers import initial_noise

    n, target = 16, 3
    loss = ClassifierLoss("digits", target)
    csv, results, grid = ["sampler,iteration,loss"], {}, []
    for label, path, steps in (("teacher DDIM 32 steps", teacher_path, 32), ("teacher DDIM 8 steps", teacher_path, 8),
                               ("4-step PD student", student_path, 4)):
        model = load_model(path)
        model.net.requires_grad_(False)
        x, _ = initial_noise(range(n), model.data_shape, 0, "cpu")
        fn = _sampler(model, steps, ["the digit 8"] * n)
        res = optimize_noise(fn, x, loss, iterations=iterations, lr=0.1)
        csv += [f"{label},{i},{v:.6g}" for i, v in enumerate(res.losses)]
        with torch.no_grad():
            before = fn(x)
        results[label] = {"nfe": steps * (2 if model.kind == "teacher" else 1), "loss_before": res.losses[0],
                          "loss_after": res.losses[-1], "accuracy_3_before": _accuracy(before, target),
                          "accuracy_3_after": _accuracy(res.x0, target),
                          "seconds_per_iteration_per_image": res.seconds_per_image, "iterations": iterations}
        grid += [(f"{label}: 'the digit 8'", before), (f"{label}: after {iterations} iterations towards 3", res.x0)]
    _grid(out / "noise_optimisation.png", grid)
    return results, "\n".join(csv) + "\n"


def attention_control(teacher_path: str, student_path: str, out: Path) -> dict:
    """Demonstration 4: word swap at several τ, and re-weighting of 'bold'."""
    from fastdiff.checkpoint import load_model
    from fastdiff.control import Reweight, WordSwap, controlled, token_position
    from fastdiff.samplers import initial_noise

    n, source, target = 32, "a bold seven", "a bold one"
    results, grid = {}, []
    for label, path, steps in (("teacher DDIM 16 steps", teacher_path, 16), ("4-step PD student", student_path, 4)):
        model = load_model(path)
        x, _ = initial_noise(range(n), model.data_shape, 0, "cpu")
        x2 = torch.cat([x, x])
        src = _sample(model, steps, [source] * n)
        own = _sample(model, steps, [target] * n)
        entry = {"source_accuracy_7": _accuracy(src, 7), "target_own_accuracy_1": _accuracy(own, 1),
                 "target_own_distance": float((own - src).abs().mean()), "tau": {}}
        groups = 2 if model.kind == "teacher" else 1
        grid += [(f"{label}: '{source}'", src), (f"{label}: '{target}' (no injection)", own)]
        for tau in (0.25, 0.5, 1.0):
            ctl = WordSwap(n, round(tau * steps), groups)
            with controlled(model.net, ctl) as net, torch.no_grad():
                swapped = _sampler(model, steps, [source] * n + [target] * n, net=net)(x2)[n:]
            entry["tau"][str(tau)] = {"inject_steps": round(tau * steps), "distance_to_source":
                                      float((swapped - src).abs().mean()), "accuracy_1": _accuracy(swapped, 1),
                                      "distance_to_target_alone": float((swapped - own).abs().mean())}
            grid.append((f"{label}: word swap, tau {tau} ({round(tau * steps)} of {steps} steps)", swapped))
        reweight = {}
        for word in ("seven", "bold"):
            for scale in (0.0, 0.5, 1.0, 4.0):
                ctl = Reweight(token_position(source, word), scale, rows=n)  # the conditional rows (first n, CFG)
                with controlled(model.net, ctl) as net, torch.no_grad():
                    xs = _sampler(model, steps, [source] * n, net=net)(x)
                reweight[f"{word} x{scale:g}"] = {"accuracy_7": _accuracy(xs, 7), "ink": _ink(xs),
                                                  "distance_to_source": float((xs - src).abs().mean())}
                if scale != 1.0:
                    grid.append((f"{label}: '{word}' x{scale:g}", xs))
        entry["reweight"] = reweight
        results[label] = entry
    _grid(out / "attention_control.png", grid)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    from fastdiff import distributed as dist
    from fastdiff.io import write_text
    from fastdiff.results import git_commit

    dist.configure_cpu_threads()
    parser = argparse.ArgumentParser(prog="python -m fastdiff.personalize_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="runs/teacher-digits-text")
    parser.add_argument("--student", default="runs/distill-digits-text/students/student_N4.pt")
    parser.add_argument("--unnamed-teacher", default="runs/teacher-digits-text-unnamed7",
                        help="a teacher whose sevens no prompt names (train --preset digits-text-unnamed7); '' skips it")
    parser.add_argument("--dark-teacher", default="runs/teacher-digits-text-dark",
                        help="a teacher that never saw a dark seven (train --preset digits-text-dark); '' skips it")
    parser.add_argument("--results-dir", default="runs/results")
    parser.add_argument("--work-dir", default="runs/personalize-demo", help="where the personalised teachers go")
    parser.add_argument("--updates", type=int, default=600, help="updates of textual inversion and DreamBooth")
    parser.add_argument("--iterations", type=int, default=20, help="noise-optimisation iterations")
    args = parser.parse_args(argv)
    for p in (args.teacher, args.student, *filter(None, (args.unnamed_teacher, args.dark_teacher))):
        if not Path(p).exists():
            raise FastdiffError(f"{p} does not exist: run python -m fastdiff.distill --preset digits-text (and "
                                "python -m fastdiff.train --preset digits-text-unnamed7 / digits-text-dark) first")
    out = Path(args.results_dir) / "personalize"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    metrics = {"personalisation": personalisation(args.teacher, out, Path(args.work_dir), args.updates)}
    erased, truth = erase_words(args.teacher, ("seven", "7"), Path(args.work_dir) / "teacher-seven-erased")
    metrics["personalisation"]["inversion_erased"] = inversion_demo(erased, "none", out, Path(args.work_dir),
                                                                    args.updates, truth, name="erased")
    for style, path in (("none", args.unnamed_teacher), ("invert", args.dark_teacher)):
        if path:
            metrics["personalisation"][f"inversion_{style}"] = inversion_demo(path, style, out, Path(args.work_dir),
                                                                             args.updates)
    metrics["noise_optimisation"], csv = noise_optimisation(args.teacher, args.student, out, args.iterations)
    metrics["attention_control"] = attention_control(args.teacher, args.student, out)
    from fastdiff.checkpoint import load_model

    metrics["provenance"] = {"teacher": args.teacher, "teacher_hash": load_model(args.teacher).hash,
                             "student": args.student, "student_hash": load_model(args.student).hash,
                             "fastdiff_commit": git_commit(), "device": "cpu", "threads": torch.get_num_threads(),
                             "torch_version": torch.__version__, "guidance_w": W, "seed": 0,
                             "wall_clock_s": round(time.perf_counter() - t0, 1)}
    write_text(out / "loss_vs_iterations.csv", csv)
    write_text(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}/metrics.json and its picture grids ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
