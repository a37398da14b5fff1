"""Latent diffusion: the autoencoder, latent teachers and students, and Stable-Diffusion-style pipelines from diffusers
(tiny random models built here from configs; no download)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fastdiff.errors import FastdiffError

pytest.importorskip("diffusers")

from test_metrics import one_thread, shared_cache  # noqa: E402,F401  (fixtures: one classifier cache, one CPU thread)


def _tiny_vae(scaling_factor: float = 0.7):
    import diffusers

    torch.manual_seed(1)
    return diffusers.AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                   layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=8,
                                   scaling_factor=scaling_factor).eval()


# --- the autoencoder and the codec ----------------------------------------------------------------------------------

def test_codec_scales_latents_and_round_trips_through_a_checkpoint_payload():
    from fastdiff.latent import Codec, clips_x0

    vae = _tiny_vae()
    codec = Codec(vae)
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (5, 4, 4, 4) and codec.latent_shape((1, 8, 8)) == (4, 4, 4)
    with torch.no_grad():  # z = mean * scaling_factor; decode divides it out again
        torch.testing.assert_close(z, vae.encode(x).latent_dist.mean * 0.7)
        torch.testing.assert_close(codec.decode(z), vae.decode(z / 0.7).sample)
    again = Codec.from_payload(codec.to_payload())
    assert again.hash == codec.hash
    assert torch.equal(again.decode(z), codec.decode(z))
    assert Codec(_tiny_vae(0.5)).hash != codec.hash  # the scaling is part of the id
    assert not clips_x0((4, 4, 4), codec) and clips_x0((1, 8, 8), None) and not clips_x0((2,), None)
    with pytest.raises(FastdiffError, match="sides divisible by 2"):
        codec.latent_shape((1, 7, 7))


def test_autoencoder_cli_sets_the_scaling_from_the_data_and_records_the_floor(tmp_path, capsys, shared_cache):
    from fastdiff.autoencoder import main
    from fastdiff.data import get_data
    from fastdiff.latent import Codec

    out = tmp_path / "ae"
    argv = ["--updates", "6", "--channels", "8", "--batch-size", "16", "--eval-samples", "40", "--out-dir", str(out)]
    assert main(argv) == 0
    info = json.loads((out / "autoencoder.json").read_text())
    codec = Codec.from_folder(out)
    assert info["id"] == codec.hash and info["latent_shape"] == [4, 4, 4] and info["eval_images"] == 40
    assert info["recon_fid"] > 0 and info["data_fid"] > 0
    z = codec.encode(get_data("digits", "train").x)  # unit variance over the training set: the data's own scaling
    assert float(z.std()) == pytest.approx(1.0, rel=1e-4)
    assert "reconstruction FID" in capsys.readouterr().out
    assert main(argv) == 0  # finished: nothing to do, same folder
    assert Codec.from_folder(out).hash == codec.hash
    with pytest.raises(FastdiffError, match="power of two"):
        main(argv[:-2] + ["--out-dir", str(tmp_path / "x"), "--downsample", "3"])
    with pytest.raises(FastdiffError, match="no AutoencoderKL"):
        Codec.from_folder(tmp_path)


def test_latent_teacher_trains_on_latents_samples_unclipped_and_the_sweep_decodes(tmp_path, shared_cache):
    from fastdiff.bench import BenchConfig, run_sweep
    from fastdiff.checkpoint import load_model
    from fastdiff.results import ResultsCSV
    from fastdiff.train import PRESETS, train

    vae_dir = tmp_path / "vae"
    _tiny_vae().save_pretrained(vae_dir)
    cfg = dataclasses.replace(PRESETS["digits-latent"], autoencoder=str(vae_dir), updates=3, batch_size=8,
                              channels=16, text_dim=16, text_layers=1, out_dir=str(tmp_path / "t"), sample_every=3,
                              ckpt_every=3)
    train(cfg, progress=False)
    model = load_model(tmp_path / "t")
    assert model.data_shape == (4, 4, 4) and model.image_shape == (1, 8, 8) and not model.clip
    assert model.codec.hash == load_model(tmp_path / "t").codec.hash
    assert list(tmp_path.joinpath("t").glob("latents-digits-train-*.pt"))  # the cached latents
    csv = run_sweep(BenchConfig(model=str(tmp_path / "t"), samplers=("ddim",), spacings=("linspace",), steps=(2,),
                                guidance=(2.0,), n_samples=20, batch_size=20, metrics=("fid",),
                                out_dir=str(tmp_path / "r"), ci_resamples=0), progress=False)
    rows = ResultsCSV(csv).rows
    assert {r["autoencoder"] for r in rows} == {model.codec.hash} and {r["clip"] for r in rows} == {"false"}
    assert {r["metric"] for r in rows} == {"fid", "prompt_accuracy"}
    import numpy as np

    saved = np.load(tmp_path / "r" / "digits" / rows[0]["samples_file"])["samples"]
    assert saved.shape[1:] == (1, 8, 8)  # decoded images, not latents
    from fastdiff.sample import SampleConfig, generate

    x, nfe = generate(SampleConfig(model=str(tmp_path / "t"), prompt="a handwritten seven", steps=2, n=3))
    assert x.shape == (3, 1, 8, 8) and nfe == 2  # decoded images


# --- a Stable-Diffusion-style pipeline built here -------------------------------------------------------------------

def _tiny_pipeline(folder):
    """unet/ (UNet2DConditionModel on 4x4x4 latents), vae/ (f = 2), text_encoder/ + tokenizer/ (tiny CLIP),
    scheduler/ (SD's DDIM: scaled_linear betas, eps, clip_sample false), saved as a StableDiffusionPipeline."""
    import diffusers

    from test_text import _tiny_clip

    text_encoder, tokenizer = _tiny_clip(folder / "_clip")
    torch.manual_seed(2)
    unet = diffusers.UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
                                          block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32,
                                          attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    with torch.no_grad():  # a random model whose output is not ~0 (diffusers zero-initialises conv_out)
        for p in unet.conv_out.parameters():
            p.normal_(0, 0.05)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=_tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                                             unet=unet, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipe")
    return folder / "pipe"


def test_a_latent_text_to_image_pipeline_is_a_teacher_guided_distils_and_exports_back(tmp_path, capsys, shared_cache):
    from fastdiff.checkpoint import load_model
    from fastdiff.distill import main as distill_main
    from fastdiff.export import main as export_main
    from fastdiff.guidance import conditional
    from fastdiff.interop import export
    from fastdiff.samplers import ddim, initial_noise, student_grid

    source = _tiny_pipeline(tmp_path)
    teacher = load_model(source, dataset="digits")
    assert (teacher.kind, teacher.data_shape, teacher.image_shape, teacher.clip) == ("teacher", (4, 4, 4), (1, 8, 8),
                                                                                      False)
    assert teacher.config["cond"] == "text" and teacher.codec is not None
    # CFG sampling agrees with diffusers' StableDiffusionPipeline (the teacher written back with a trailing DDIM
    # scheduler, which export checks: fastdiff reload bit-identical, diffusers within 1e-4 relative)
    _, checked = export(teacher, tmp_path / "teacher-export", check=3)
    assert checked["fastdiff_max_abs"] == 0 and checked["diffusers_rel"] < 1e-4

    # one guided distillation round: the w-conditioned student (time_cond_proj_dim), then 4 -> 2 steps
    run = tmp_path / "d"
    assert distill_main(["--teacher", str(source), "--dataset", "digits", "--guided", "--method", "pd",
                         "--start-steps", "4", "--rounds", "1", "--guided-base-updates", "3",
                         "--updates-per-round", "3", "--batch-size", "8", "--eval-samples", "10", "--bench", "false",
                         "--out-dir", str(run)]) == 0
    student = load_model(run / "students" / "student_N2.pt")
    assert student.kind == "student" and student.steps == 2 and student.codec.hash == teacher.codec.hash
    assert student.net.unet.config.time_cond_proj_dim == 256
    out = tmp_path / "student-export"
    assert export_main([str(run), "--out", str(out), "--check", "3"]) == 0
    assert "StableDiffusionPipeline" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"unet", "vae", "text_encoder", "tokenizer", "scheduler",
                                               "model_index.json", "README.md"}
    back = load_model(out)  # the exported folder names its data set
    assert back.kind == "student" and back.steps == 2 and back.codec.hash == student.codec.hash
    x, _ = initial_noise(range(4), (4, 4, 4), 0, "cpu")
    y = student.net.text.tokenize(["a handwritten seven"] * 4)
    w = torch.full((4,), 3.0)
    with torch.no_grad():
        a = ddim(conditional(student.net, y, w), x, student_grid(2), schedule=student.schedule, param=student.param).x
        b = ddim(conditional(back.net, y, w), x, student_grid(2), schedule=back.schedule, param=back.param).x
    assert torch.equal(a, b)  # the same samples after export and reload
    assert torch.equal(student.codec.decode(a), back.codec.decode(b))


def test_pipeline_folders_fastdiff_cannot_load_are_refused_in_one_line(tmp_path):
    import shutil

    from fastdiff.checkpoint import load_model

    source = _tiny_pipeline(tmp_path)
    with pytest.raises(FastdiffError, match="--dataset"):
        load_model(source)
    with pytest.raises(FastdiffError, match="has shape 3x32x32"):
        load_model(source, dataset="cifar10")
    shutil.rmtree(source / "vae")
    with pytest.raises(FastdiffError, match="vae"):
        load_model(source, dataset="digits")


def _fake_hub(monkeypatch, repo):
    """huggingface_hub's listing and download served from the folder `repo` (allow_patterns honoured, as the hub
    does), so that no test needs the internet. -> the folders each download made."""
    import fnmatch
    import shutil
    import tempfile
    from pathlib import Path

    import huggingface_hub

    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    made = []

    def download(repo_id, allow_patterns=None, local_files_only=False, **_):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")
        out = Path(tempfile.mkdtemp(prefix="snapshot", dir=repo.parent))
        for name in files:
            if allow_patterns is None or any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(repo / name, out / name)
        made.append(out)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **_: files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    return made


def test_a_hub_pipeline_in_mixed_formats_downloads_bin_for_every_component(tmp_path, monkeypatch):
    """diffusers' all-or-nothing rule: .bin for every component when one lacks safetensors; a component that still has
    no weights is one line."""
    from fastdiff.checkpoint import load_model

    import shutil

    from safetensors.torch import load_file

    mixed = shutil.copytree(_tiny_pipeline(tmp_path), tmp_path / "hub")
    bin_names = {"unet": "diffusion_pytorch_model.bin", "vae": "diffusion_pytorch_model.bin",
                 "text_encoder": "pytorch_model.bin"}
    for part, name in bin_names.items():  # .bin for every component, safetensors for only unet/ and vae/
        weights, = (mixed / part).glob("*.safetensors")
        torch.save(load_file(weights), mixed / part / name)
        if part == "text_encoder":
            weights.unlink()
    made = _fake_hub(monkeypatch, mixed)
    teacher = load_model("org/mixed", dataset="digits")
    assert teacher.config["cond"] == "text" and len(made) == 1
    assert not any(made[0].rglob("*.safetensors")) and all(any((made[0] / p).glob("*.bin"))
                                                           for p in ("unet", "vae", "text_encoder"))

    for weights in (mixed / "text_encoder").glob("*.bin"):  # a component with no weights in any format
        weights.unlink()
    made = _fake_hub(monkeypatch, mixed)
    with pytest.raises(FastdiffError, match=r"org/mixed: .*text_encoder has a config but no weights"):
        load_model("org/mixed", dataset="digits")


def test_a_vae_with_a_shift_is_refused_by_the_sd_layout_export_and_the_check_compares_decoded_images(tmp_path):
    """StableDiffusionPipeline decodes z / scaling_factor and ignores the VAE's shift_factor, which fastdiff's codec
    adds (as SD3-style pipelines do): exporting such a model in that layout is refused before anything is written, and
    the export check compares decoded images, so a decoder that differs is caught even when the latents agree."""
    import json
    import shutil

    from fastdiff.checkpoint import load_model
    from fastdiff.interop import export, verify

    source = _tiny_pipeline(tmp_path)
    shifted = shutil.copytree(source, tmp_path / "shifted")
    vae_cfg = shifted / "vae" / "config.json"
    vae_cfg.write_text(json.dumps({**json.loads(vae_cfg.read_text()), "shift_factor": 0.5}))
    model = load_model(shifted, dataset="digits")
    assert model.codec.shift == 0.5
    with pytest.raises(FastdiffError, match="shift_factor 0.5.*StableDiffusionPipeline layout ignores"):
        export(model, tmp_path / "out", check=2)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))

    # the same latents, decoded with and without the shift: the check sees the difference in the images
    _, checked = export(load_model(source, dataset="digits"), tmp_path / "plain", check=2)
    assert checked["diffusers_rel"] < 1e-4
    (tmp_path / "plain" / "vae" / "config.json").write_text(vae_cfg.read_text())
    assert verify(model, tmp_path / "plain", 2)["diffusers_rel"] > 1e-3  # export accepts <= 1e-4
