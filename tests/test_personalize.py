"""Personalisation and control on the text path: textual inversion, DreamBooth, noise optimisation through a sampler,
cross-attention control — closed forms where they exist, tiny models otherwise."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fastdiff.errors import FastdiffError
from test_metrics import one_thread, shared_cache  # noqa: F401  (fixtures: one classifier cache, one CPU thread)
from test_text import _text_unet


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A text teacher trained for a few updates (its checkpoint path)."""
    from fastdiff.train import PRESETS, train

    out = tmp_path_factory.mktemp("teacher")
    cfg = dataclasses.replace(PRESETS["digits-text"], updates=6, batch_size=16, channels=16, text_dim=16,
                              text_layers=1, head_dim=8, sample_every=10_000, out_dir=str(out))
    train(cfg, progress=False)
    return out / "checkpoint.pt"


def _perturbed(net):
    with torch.no_grad():  # zero-initialised output layers would hide the text's effect
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


# --- textual inversion -----------------------------------------------------------------------------------------------

def test_textual_inversion_changes_nothing_but_the_new_word(tmp_path, tiny_teacher):
    from fastdiff.checkpoint import load_model
    from fastdiff.personalize import PersonalizeConfig, personalize

    teacher = load_model(tiny_teacher)
    _perturbed(teacher.net)
    torch.save({**torch.load(tiny_teacher, weights_only=True), "ema": teacher.net.state_dict()}, tmp_path / "t.pt")
    teacher = load_model(tmp_path / "t.pt")
    run = personalize(PersonalizeConfig(model=str(tmp_path / "t.pt"), updates=5, batch_size=8, init_word="seven",
                                        out_dir=str(tmp_path / "ti")), progress=False)
    model = load_model(run)
    assert model.kind == "teacher" and model.network["text_tokens"] == ["<s*>"]
    before, after = teacher.net.state_dict(), model.net.state_dict()
    assert set(after) - set(before) == {"text.encoder.extra"}
    assert all(torch.equal(before[k], after[k]) for k in before)  # the frozen model is unchanged
    seven = before["text.encoder.token.weight"][teacher.net.text.tokenize(["seven"])[0, 0]]
    assert not torch.equal(after["text.encoder.extra"][0], seven)  # the new vector moved from its start
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 0.5)
    plain = ["a handwritten seven", "the digit 3", "a bold one", "a picture of a thin 9"]
    with torch.no_grad():  # closed form: prompts without the word give exactly the teacher's output
        assert torch.equal(model.net(x, t, model.net.text.tokenize(plain)),
                           teacher.net(x, t, teacher.net.text.tokenize(plain)))
        y_new = model.net.text.tokenize(["a picture of a <s*>"] * 4)
        y_init = model.net.text.tokenize(["a picture of a seven"] * 4)
        assert not torch.equal(model.net(x, t, y_new), model.net(x, t, y_init))  # only through the new word
    with pytest.raises(FastdiffError, match="already a word"):
        personalize(PersonalizeConfig(model=str(run), token="<s*>", updates=1, out_dir=str(tmp_path / "again")),
                    progress=False)

    # a second word on the personalised model, by either method: the first word's row is kept
    for method in ("textual-inversion", "dreambooth"):
        again = personalize(PersonalizeConfig(model=str(run), method=method, token="<t*>", updates=2, batch_size=8,
                                              prior_images=8, out_dir=str(tmp_path / method)), progress=False)
        second = load_model(again)
        assert second.network["text_tokens"] == ["<s*>", "<t*>"]
        extra = second.net.state_dict()["text.encoder.extra"]
        assert extra.shape[0] == 2 and torch.equal(extra[0], after["text.encoder.extra"][0])


# --- DreamBooth ------------------------------------------------------------------------------------------------------

def test_dreambooth_loss_without_subject_images_is_lambda_times_the_prior_loss():
    from fastdiff.losses import diffusion_loss
    from fastdiff.personalize import dreambooth_loss
    from fastdiff.schedules import Schedule

    net = _text_unet()
    schedule = Schedule("cosine", 1000)
    prior = torch.randn(6, 1, 8, 8)
    y = net.text.tokenize(["a seven"] * 6)
    none = torch.zeros(0, 1, 8, 8)
    for lam in (0.0, 0.5, 2.0):
        got = dreambooth_loss(net, none, None, prior, y, lam, schedule, "v", "snr-trunc",
                              torch.Generator().manual_seed(3))
        want = lam * diffusion_loss(net, prior, schedule, "v", "snr-trunc", torch.Generator().manual_seed(3),
                                    y=y).mean()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # with subject images: the subject term first, the prior term on the same generator after it
    subject = torch.randn(3, 1, 8, 8)
    ys = net.text.tokenize(["a seven"] * 3)
    g = torch.Generator().manual_seed(4)
    want = (diffusion_loss(net, subject, schedule, "v", "snr-trunc", g, y=ys).mean()
            + 2.0 * diffusion_loss(net, prior, schedule, "v", "snr-trunc", g, y=y).mean())
    torch.testing.assert_close(dreambooth_loss(net, subject, ys, prior, y, 2.0, schedule, "v", "snr-trunc",
                                               torch.Generator().manual_seed(4)), want)


def test_dreambooth_teacher_is_a_teacher_that_distils(tmp_path, tiny_teacher, capsys):
    from fastdiff.checkpoint import load_model
    from fastdiff.distill import main as distill_main
    from fastdiff.personalize import main

    assert main(["--model", str(tiny_teacher), "--method", "dreambooth", "--token", "<v>", "--updates", "3",
                 "--batch-size", "8", "--prior-images", "8", "--out-dir", str(tmp_path / "db")]) == 0
    assert '"a <v> seven"' in capsys.readouterr().out
    model = load_model(tmp_path / "db")
    teacher = load_model(tiny_teacher)
    assert model.kind == "teacher" and model.network["text_tokens"] == ["<v>"] and model.hash != teacher.hash
    changed = [k for k, v in teacher.net.state_dict().items() if not torch.equal(v, model.net.state_dict()[k])]
    assert any(k.startswith("down") or k.startswith("mid") for k in changed)  # the U-Net itself was fine-tuned
    assert distill_main(["--teacher", str(tmp_path / "db" / "checkpoint.pt"), "--teacher-preset", "digits-text",
                         "--guided", "--method", "pd", "--start-steps", "4", "--rounds", "1",
                         "--guided-base-updates", "2", "--updates-per-round", "2", "--batch-size", "8",
                         "--eval-samples", "10", "--bench", "false", "--out-dir", str(tmp_path / "d")]) == 0
    student = load_model(tmp_path / "d" / "students" / "student_N2.pt")
    assert student.network["text_tokens"] == ["<v>"]
    y = student.net.text.tokenize(["a <v> seven"])
    with torch.no_grad():
        assert student.net(torch.randn(1, 1, 8, 8), torch.full((1,), 0.5), y, torch.full((1,), 2.0)).isfinite().all()


def test_personalize_refuses_bad_input_in_one_line(tmp_path, tiny_teacher):
    from fastdiff.personalize import main

    for argv, match in ((["--images", "digits:seven"], "digits:DIGIT:N"),
                        (["--token", "two words"], "one word"),
                        (["--method", "dreambooth", "--class-word", "7"], "digit word"),
                        (["--images", str(tmp_path)], "no images")):
        with pytest.raises(FastdiffError, match=match):
            main(["--model", str(tiny_teacher), "--updates", "1", "--out-dir", str(tmp_path / "x"), *argv])
    assert not (tmp_path / "x").exists()


# --- noise optimisation through a differentiable sampler ----------------------------------------------------------

def test_noise_optimisation_differentiates_through_the_sampler_and_lowers_the_loss(shared_cache):
    from fastdiff.guidance import conditional
    from fastdiff.noiseopt import ClassifierLoss, FeatureCosineLoss, optimize_noise
    from fastdiff.samplers import ddim, initial_noise, student_grid
    from fastdiff.schedules import Schedule

    net = _text_unet().requires_grad_(False)
    schedule = Schedule("cosine", 1000)
    y = net.text.tokenize(["the digit 8"] * 4)
    fn = lambda x: ddim(conditional(net, y), x, student_grid(2), schedule=schedule, param="v").x  # noqa: E731
    x, _ = initial_noise(range(4), (1, 8, 8), 0, "cpu")
    with torch.no_grad():
        reference = fn(x)
    xg = x.clone().requires_grad_(True)
    out = fn(xg)
    torch.testing.assert_close(out, reference)  # the differentiable path computes the same samples
    out.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    loss = ClassifierLoss("digits", 3)
    res = optimize_noise(fn, x, loss, iterations=6, lr=0.2)
    assert len(res.losses) == 7 and res.losses[-1] < res.losses[0] and res.seconds_per_image > 0
    assert not torch.equal(res.x_T, x) and res.x0.shape == x.shape
    cos = FeatureCosineLoss("digits", reference)
    assert float(cos(reference).max()) < 0.2 and cos(torch.rand(2, 1, 8, 8) * 2 - 1).shape == (2,)


def test_clip_loss_from_a_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from fastdiff.noiseopt import ClipLoss
    from test_text import _tiny_clip

    _, tokenizer = _tiny_clip(tmp_path / "parts")
    text = transformers.CLIPTextConfig(vocab_size=tokenizer.vocab_size + 2, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=8)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                           projection_dim=16))
    model.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    loss = ClipLoss(str(tmp_path / "clip"), "a handwritten seven")
    x = (torch.rand(3, 1, 8, 8) * 2 - 1).requires_grad_(True)
    value = loss(x)
    assert value.shape == (3,) and bool(((value >= 0) & (value <= 2)).all())
    value.sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(FastdiffError, match="no CLIPModel"):
        ClipLoss(str(tmp_path), "a seven")


# --- cross-attention control -------------------------------------------------------------------------------------

def test_controller_is_the_fused_attention_until_it_edits():
    from fastdiff.control import Controller, Reweight, WordSwap, attach, controlled

    net = _text_unet()
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 0.5)
    y = net.text.tokenize(["a bold seven", "a thin one", "a bold seven", "a bold one"])
    with torch.no_grad():
        fused = net(x, t, y)
        for ctl in (Controller(), Reweight(1, 1.0, rows=4), WordSwap(2, inject_steps=0)):
            with controlled(net, ctl) as model:
                torch.testing.assert_close(model(x, t, y), fused, rtol=1e-5, atol=1e-6)
        assert torch.equal(net(x, t, y), fused)  # detached again: the fused path
        # word swap, injecting: the target rows get the source rows' maps; identical source and target rows give
        # the fused output, a swapped word changes only the target rows
        same = net.text.tokenize(["a bold seven"] * 4)
        x2 = torch.cat([x[:2], x[:2]])
        with controlled(net, WordSwap(2, inject_steps=1)) as model:
            torch.testing.assert_close(model(x2, t, same), net(x2, t, same), rtol=1e-5, atol=1e-6)
        swap = net.text.tokenize(["a bold seven", "a bold three", "a bold one", "a bold two"])
        ctl = WordSwap(2, inject_steps=1)
        with controlled(net, ctl) as model:
            edited = model(x2, t, swap)
            assert ctl.step == 1
            later = model(x2, t, swap)  # past the injection: plain attention again
        plain = net(x2, t, swap)
        torch.testing.assert_close(edited[:2], plain[:2], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(edited[2:], plain[2:], atol=1e-6)
        torch.testing.assert_close(later, plain, rtol=1e-5, atol=1e-6)
        with controlled(net, Reweight(1, 4.0, rows=2)) as model:
            heavy = model(x, t, y)
        torch.testing.assert_close(heavy[2:], fused[2:], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(heavy[:2], fused[:2], atol=1e-6)
    with pytest.raises(ValueError, match="text-conditioned"):
        attach(torch.nn.Linear(2, 2), Controller())


def test_inpainting_runs_on_a_guided_student_grid_and_keeps_the_known_region():
    from fastdiff.editing import inpaint
    from fastdiff.guidance import conditional
    from fastdiff.samplers import sample_generators, student_grid
    from fastdiff.schedules import Schedule

    net = _text_unet(scalar_cond=True)
    y = net.text.tokenize(["a bold one"] * 3)
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1  # the left half is known
    with torch.no_grad():
        out = inpaint(conditional(net, y, torch.full((3,), 2.0)), x0, mask, student_grid(2),
                      schedule=Schedule("cosine", 1000), param="v", generator=sample_generators(0, range(3)))
    assert out.nfe == 2 and torch.equal(out.x[..., :4], x0[..., :4]) and not torch.equal(out.x[..., 4:], x0[..., 4:])


def test_erase_words_replaces_only_their_rows_and_keeps_a_loadable_teacher(tmp_path, tiny_teacher):
    """The demo's erased teacher: the rows of the erased words are fresh draws (both weight sets), every other
    weight is the teacher's, the originals come back for comparison, and prompts without the words sample as
    before."""
    from fastdiff.checkpoint import load_model
    from fastdiff.personalize_demo import _sample, erase_words
    from fastdiff.text import VOCAB

    path, original = erase_words(str(tiny_teacher), ("seven", "7"), tmp_path / "erased")
    before, after = load_model(tiny_teacher), load_model(path)
    rows = before.net.text.encoder.token.weight, after.net.text.encoder.token.weight
    erased = [VOCAB.index(w) for w in ("seven", "7")]
    kept = [i for i in range(len(VOCAB)) if i not in erased]
    assert torch.equal(rows[0][kept], rows[1][kept]) and not torch.equal(rows[0][erased], rows[1][erased])
    assert len(original) == 20 and torch.equal(original["seven"], rows[0][VOCAB.index("seven")])
    a = {k: v for k, v in before.net.state_dict().items() if k != "text.encoder.token.weight"}
    assert all(torch.equal(v, after.net.state_dict()[k]) for k, v in a.items())
    assert torch.equal(_sample(before, 2, ["a handwritten three"] * 2), _sample(after, 2, ["a handwritten three"] * 2))
