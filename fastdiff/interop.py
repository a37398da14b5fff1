"""diffusers folders in and out: a `UNet2DModel` (pipeline folder, bare model folder, or hub id) as a fastdiff
teacher, and a fastdiff student of the `diffusers-unet2d` architecture as a diffusers `DDIMPipeline` folder; a latent
text-to-image pipeline folder (StableDiffusionPipeline layout: UNet2DConditionModel, AutoencoderKL, CLIP text encoder
and tokenizer) as a text-conditioned latent teacher (fastdiff.models.diffusers_cond, fastdiff.latent), and its
students back in the same layout (a guided student's w through the UNet's time_cond_proj_dim, as LCM).

The time convention (tau = t·T - 1) lives in fastdiff.models.diffusers_unet; the schedule conversion is
`schedule_from_scheduler`, the one place that reads a diffusers scheduler config. Scheduler keys, each honoured or
refused (FastdiffError, exit 2):

- `trained_betas`, or `beta_schedule` linear / scaled_linear / squaredcos_cap_v2 with `beta_start`, `beta_end`,
  `num_train_timesteps`: a fastdiff Schedule of kind "trained" holding the betas the scheduler itself computes
  (float32 in diffusers), widened to float64; alpha_bar is then their float64 cumulative product (diffusers
  multiplies in float32). An exported folder's `_fastdiff` block names the exact schedule (e.g. fastdiff's
  continuous cosine) and is preferred.
- `prediction_type`: epsilon / v_prediction / sample -> param eps / v / x0.
- `rescale_betas_zero_snr`: refused (alpha_bar_T = 0: x_T carries no signal and x0 = (x - sigma eps)/alpha divides
  by 0 at t = 1); `thresholding`: refused; `clip_sample` false or `clip_sample_range` != 1: refused (fastdiff
  clips x0 to [-1, 1] on pixel data); `variance_type` learned / learned_range: refused (fixed_small/large are the
  DDPM sampler's two variances, both in fastdiff's sweep; null, the DPM-Solver schedulers' default, is no variance).
- `timestep_spacing`, `steps_offset`, `set_alpha_to_one`: they place diffusers' *inference* grid and change nothing
  the model computes; fastdiff samples on its own grids (its `trailing` spacing is diffusers' trailing) and
  records them.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from fastdiff.errors import FastdiffError
from fastdiff.models.diffusers_unet import (DiffusersUNet, DiffusersUNetConfig, check_unet_config, config_json,
                                            require_diffusers)
from fastdiff.schedules import Schedule

log = logging.getLogger(__name__)

PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
PARAM_TO_PREDICTION = {v: k for k, v in PREDICTION.items()}
VARIANCES_OK = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")
LEARNED_VARIANCES = ("learned", "learned_range")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SUPPORTED = ("UNet2DModel (alone, or in a pipeline folder such as DDPMPipeline/DDIMPipeline), or a latent "
             "text-to-image pipeline folder (UNet2DConditionModel, AutoencoderKL vae/, CLIP text_encoder/ and "
             "tokenizer/, as StableDiffusionPipeline)")


def is_diffusers_source(source) -> bool:
    """Whether `source` names a diffusers model: a folder with model_index.json or a diffusers config.json, or
    (not an existing path, and `org` not a local folder) a hub id `org/name`."""
    p = Path(str(source))
    if p.is_dir():
        return (p / "model_index.json").is_file() or _class_name(p / "config.json") is not None
    # org/name whose org is not a local folder: `runs/missing` stays a (missing) local path
    return (not p.exists() and bool(HUB_ID.match(str(source))) and not str(source).endswith(".pt")
            and not p.parent.exists())


def _class_name(config_path: Path) -> str | None:
    try:
        return json.loads(config_path.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError:
        raise FastdiffError(f"{path} is missing: {what}") from None
    except ValueError:
        raise FastdiffError(f"{path} is not valid JSON") from None
    if not isinstance(data, dict):
        raise FastdiffError(f"{path} is not a JSON object")
    return data


def local_folder(source: str) -> Path:
    """A local folder for `source`: itself, or a hub id downloaded (or found in the hub cache) with
    huggingface_hub. FastdiffError when the hub cannot be reached (offline) or the id does not exist."""
    p = Path(source)
    if p.is_dir():
        return p
    require_diffusers()
    from diffusers.pipelines.pipeline_loading_utils import is_safetensors_compatible
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        try:
            files = list_repo_files(source)
        except Exception:  # offline: the hub cache may hold it (snapshot_download answers from there, or raises)
            return Path(snapshot_download(source, local_files_only=True))
        # diffusers' own rule, all or nothing: safetensors when every component has them, else .bin (loaded with
        # weights_only=True) for every component -- a mixed repository must not leave a component without weights
        weights = "*.safetensors" if is_safetensors_compatible(files) else "*.bin"
        return Path(snapshot_download(source, allow_patterns=["*.json", weights, "*.txt", "*.md"]))
    except Exception as err:  # offline, unknown id, gated repo: huggingface_hub raises many types
        raise FastdiffError(f"{source!r} is no local path, and the Hugging Face hub cannot give it "
                            f"({type(err).__name__}; offline?): check the path, or download the model where there is "
                            f"internet (`hf download {source} --local-dir DIR`) and pass the folder") from None


def require_weights(source, *parts: Path) -> None:
    """FastdiffError (one line) naming the first model folder in `parts` that holds no weights file (.safetensors or
    .bin, sharded or not): a partial download or copy, which diffusers and transformers report as a raw OSError."""
    for part in parts:
        if not any(part.glob("*.safetensors")) and not any(part.glob("*.bin")):
            raise FastdiffError(f"{source}: {part} has a config but no weights (no .safetensors or .bin file): "
                                "download or copy the model again, every component in one format")


def find_parts(folder: Path) -> tuple[Path, Path]:
    """-> (the UNet2DModel's folder, its scheduler config) in a pipeline folder or a bare model folder."""
    if (folder / "model_index.json").is_file():
        index = _read_json(folder / "model_index.json", "a diffusers pipeline folder has one")
        unet = index.get("unet")
        if not unet:
            raise FastdiffError(f"{folder}: the pipeline has no `unet`; fastdiff loads {SUPPORTED}")
        return folder / "unet", folder / "scheduler" / "scheduler_config.json"
    for sched in (folder / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json",
                  folder.parent / "scheduler" / "scheduler_config.json"):
        if sched.is_file():
            return folder, sched
    raise FastdiffError(f"{folder} is a bare model folder without a scheduler config: put the scheduler's "
                        "scheduler_config.json beside config.json (it holds the betas the model was trained with)")


def schedule_from_scheduler(sc: dict, where: str = "scheduler config",
                            latent: bool = False) -> tuple[Schedule, str, dict]:
    """A diffusers scheduler config -> (Schedule, param, the inference-grid keys recorded as they are). See the
    module docstring for every key; FastdiffError for one that is refused. `latent`: the model samples latents, which
    are never clipped, so clip_sample is ignored (Stable Diffusion's schedulers set it false)."""
    def refuse(why: str):
        raise FastdiffError(f"{where}: {why}")

    block = sc.get("_fastdiff") or {}
    pred = sc.get("prediction_type", "epsilon")
    if pred not in PREDICTION:
        refuse(f"prediction_type {pred!r} is not supported; fastdiff takes {', '.join(PREDICTION)}")
    if sc.get("rescale_betas_zero_snr"):
        refuse("rescale_betas_zero_snr=true gives alpha_bar_T = 0 (zero terminal SNR), which fastdiff refuses: x0 "
               "and eps are undefined from x at t = 1 for eps/x0 models; use the model without it")
    if sc.get("thresholding"):
        refuse("thresholding=true (dynamic thresholding) is not supported; set it false")
    if not latent and (not sc.get("clip_sample", True) or float(sc.get("clip_sample_range", 1.0)) != 1.0):
        refuse("clip_sample false or clip_sample_range != 1 is not supported: fastdiff clips x0 to [-1, 1] on pixel "
               "data")
    # null is the default of DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler and others: the model predicts
    # no variance (what a pipeline saved after swapping in DPM-Solver++ has)
    variance = sc.get("variance_type")
    if variance in LEARNED_VARIANCES:
        refuse(f"variance_type {variance!r} (a learned variance) is not supported; fastdiff takes "
               f"{', '.join(VARIANCES_OK)} or null")
    if variance is not None and variance not in VARIANCES_OK:
        refuse(f"variance_type {variance!r} is not supported; fastdiff takes {', '.join(VARIANCES_OK)} or null")
    if block.get("schedule"):
        schedule = Schedule.from_dict(block["schedule"])
    else:
        kind = sc.get("beta_schedule", "linear")
        if sc.get("trained_betas") is None and kind not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            refuse(f"beta_schedule {kind!r} is not supported; fastdiff takes linear, scaled_linear, "
                   "squaredcos_cap_v2 or trained_betas")
        # the scheduler's own betas (diffusers computes them in float32), widened to float64
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        betas = require_diffusers().DDPMScheduler(**{k: sc[k] for k in keys if k in sc}).betas.double()
        schedule = Schedule("trained", len(betas), betas=tuple(betas.tolist()))
    recorded = {k: sc[k] for k in ("timestep_spacing", "steps_offset", "set_alpha_to_one", "variance_type",
                                   "_class_name") if k in sc}
    return schedule, PREDICTION[pred], recorded


def _scheduler_and_dataset(sched_path: Path, source, dataset: str, latent: bool = False):
    """-> (schedule, param, recorded keys, the `_fastdiff` block, the data set): the scheduler config read as
    `schedule_from_scheduler` does, and --dataset (else the data set an exported folder records; FastdiffError when
    neither names one)."""
    sc = _read_json(sched_path, "the scheduler config with the betas the model was trained with")
    schedule, param, recorded = schedule_from_scheduler(sc, str(sched_path), latent=latent)
    block = sc.get("_fastdiff") or {}
    dataset = dataset or block.get("dataset", "")
    if not dataset:
        raise FastdiffError(f"{source}: name the data set the model was trained on with --dataset (e.g. cifar10, "
                            "digits, folder with --data-root)")
    return schedule, param, recorded, block, dataset


def _pretrained(cls, unet_dir: Path):
    """diffusers model class `cls` from `unet_dir`; FastdiffError (one line) for missing or corrupt weights."""
    try:
        return cls.from_pretrained(unet_dir, low_cpu_mem_usage=False)
    except Exception as err:  # missing/corrupt weights: diffusers raises OSError, ValueError, safetensors errors
        raise FastdiffError(f"cannot load the {cls.__name__} weights in {unet_dir} ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:160] if str(err) else ''})") from None


def read_diffusers(source: str, device="cpu", dataset: str = "", data_root: str = "") -> dict:
    """A diffusers `UNet2DModel` with its scheduler, as the pieces of a fastdiff LoadedModel (which
    `fastdiff.load_model` assembles): a teacher, or a student when the folder was exported by fastdiff. `dataset`
    names the data it was trained on (an exported folder records it) and is checked against the model's
    `sample_size` and `in_channels`. FastdiffError for every bad input."""
    from fastdiff.data import static_info
    from fastdiff.models import network_to_dict

    diffusers = require_diffusers()
    folder = local_folder(source)
    unet_dir, sched_path = find_parts(folder)
    unet_cfg = _read_json(unet_dir / "config.json", "the UNet's config.json")
    cls = unet_cfg.get("_class_name")
    if cls == "UNet2DConditionModel":
        return _read_conditional(str(source), folder, unet_dir, sched_path, device, dataset, data_root)
    if cls != "UNet2DModel":
        raise FastdiffError(f"{unet_dir}: model class {cls!r} is not supported; fastdiff loads {SUPPORTED}")
    check_unet_config(unet_cfg, str(unet_dir))
    require_weights(source, unet_dir)
    schedule, param, recorded, block, dataset = _scheduler_and_dataset(sched_path, source, dataset)
    size, channels = int(unet_cfg["sample_size"]), int(unet_cfg.get("in_channels", 3))
    shape, _ = static_info(dataset, size)
    if tuple(shape) != (channels, size, size):
        raise FastdiffError(f"{source} makes {channels}x{size}x{size} images but data set {dataset!r} has shape "
                            f"{'x'.join(map(str, shape))}; pass the --dataset it was trained on")
    unet = _pretrained(diffusers.UNet2DModel, unet_dir)
    netcfg = DiffusersUNetConfig(unet_config=config_json(dict(unet.config)), T=schedule.T,
                                 discrete=bool(block.get("discrete", True)))
    net = DiffusersUNet(netcfg, unet).to(device).eval().requires_grad_(False)
    # the training config a fastdiff run of this model would have (what distill and bench read from a teacher)
    config = {"dataset": dataset, "data_root": data_root or block.get("data_root", ""), "image_size": size,
              "schedule": schedule.kind, "T": schedule.T, "param": param, "arch": "diffusers-unet2d"}
    return {"net": net, "schedule": schedule, "param": param, "kind": block.get("kind", "teacher"),
            "steps": block.get("steps"), "dataset": dataset, "config": config, "data_shape": tuple(shape),
            "network": network_to_dict(netcfg), "recorded": {"source": str(source), **recorded}}


def _read_conditional(source: str, folder: Path, unet_dir: Path, sched_path: Path, device, dataset: str,
                      data_root: str) -> dict:
    """read_diffusers for a latent text-to-image pipeline: the UNet2DConditionModel with the pipeline's CLIP text
    encoder (fastdiff.models.diffusers_cond) sampling the latents of its AutoencoderKL (fastdiff.latent.Codec)."""
    from fastdiff.data import static_info
    from fastdiff.latent import Codec
    from fastdiff.models import network_to_dict
    from fastdiff.models.diffusers_cond import DiffusersCondConfig, DiffusersCondUNet

    diffusers = require_diffusers()
    missing = [part for part in ("vae", "text_encoder", "tokenizer") if not (folder / part).is_dir()]
    if not (folder / "model_index.json").is_file() or missing:
        raise FastdiffError(f"{folder}: a UNet2DConditionModel is loaded from its pipeline folder, with "
                            f"{', '.join(missing) or 'model_index.json'} beside it (vae/, text_encoder/, tokenizer/)")
    require_weights(source, unet_dir, folder / "vae", folder / "text_encoder")
    schedule, param, recorded, block, dataset = _scheduler_and_dataset(sched_path, source, dataset, latent=True)
    codec = Codec.from_folder(folder / "vae")
    unet = _pretrained(diffusers.UNet2DConditionModel, unet_dir)
    size, channels = int(unet.config.sample_size), int(unet.config.in_channels)
    latent = (channels, size, size)
    image = codec.image_shape(latent)
    shape, _ = static_info(dataset, image[1])
    if tuple(shape) != tuple(image):
        raise FastdiffError(f"{source} decodes to {'x'.join(map(str, image))} images but data set {dataset!r} has "
                            f"shape {'x'.join(map(str, shape))}; pass the --dataset it was trained on")
    netcfg = DiffusersCondConfig(unet_config=config_json(dict(unet.config)), text_encoder=str(folder), T=schedule.T,
                                 discrete=bool(block.get("discrete", True)),
                                 scalar_cond=bool(unet.config.time_cond_proj_dim))
    net = DiffusersCondUNet(netcfg, unet).to(device).eval().requires_grad_(False)
    config = {"dataset": dataset, "data_root": data_root or block.get("data_root", ""), "image_size": image[1],
              "schedule": schedule.kind, "T": schedule.T, "param": param, "arch": "diffusers-cond", "cond": "text",
              "scalar_cond": netcfg.scalar_cond, "autoencoder": str(folder / "vae")}
    return {"net": net, "schedule": schedule, "param": param, "kind": block.get("kind", "teacher"),
            "steps": block.get("steps"), "dataset": dataset, "config": config, "data_shape": latent,
            "network": network_to_dict(netcfg), "recorded": {"source": source, **recorded}, "codec": codec.to(device)}


def scheduler_config(schedule: Schedule, param: str, block: dict, latent: bool = False) -> dict:
    """The DDIMScheduler config of an exported model: stock keys diffusers reads (the beta list in diffusers'
    terms: `beta_schedule` when diffusers has the kind, else `trained_betas` = 1 - alpha_bar(k/T)/alpha_bar((k-1)/T)
    from fastdiff's schedule), trailing spacing (grid t_i = i/N when N divides T), alpha_bar(0) = 1, x0 clipped to
    [-1, 1] (not for a `latent` model), and the `_fastdiff` block that fastdiff prefers on import."""
    cfg = {"num_train_timesteps": schedule.T, "prediction_type": PARAM_TO_PREDICTION[param],
           "timestep_spacing": "trailing", "steps_offset": 0, "set_alpha_to_one": True, "clip_sample": not latent,
           "clip_sample_range": 1.0, "thresholding": False, "rescale_betas_zero_snr": False}
    if schedule.kind in ("linear", "scaled_linear"):
        cfg.update(beta_schedule=schedule.kind, beta_start=schedule.beta_start, beta_end=schedule.beta_end)
    elif schedule.kind == "squaredcos_cap_v2":
        cfg.update(beta_schedule="squaredcos_cap_v2")
    else:
        ab = schedule.alpha_bar(torch.arange(schedule.T + 1, dtype=torch.float64) / schedule.T)
        cfg.update(beta_schedule="linear", trained_betas=(1 - ab[1:] / ab[:-1]).tolist())
    cfg["_fastdiff"] = block
    return cfg


def _guidance_text(net) -> str:
    if not _is_conditional(net):
        return "none (unconditional)"
    if net.cfg.scalar_cond:
        return ("a guidance-weight input (time_cond_proj_dim, as LCM): the pipeline's guidance_scale is fastdiff's w, "
                "one network evaluation per step")
    return "classifier-free: u + s (c - u), s = guidance_scale = fastdiff's w, u = the empty prompt's output"


def model_card(model, block: dict, extra: dict) -> str:
    """The README.md of an exported folder: what the model is, how to sample it, where it came from."""
    n = block.get("steps")
    lines = [f"# fastdiff {model.kind}: {model.dataset}" + (f", {n}-step" if n else ""), "",
             f"Exported by fastdiff from `{model.path}` (model id `{model.hash}`).", "",
             "| field | value |", "| --- | --- |"]
    rows = {"kind": model.kind, "method": extra.get("method", "-"), "steps N": n or "-",
            "grid": "t_i = i/N (diffusers timesteps i*T/N - 1: DDIMScheduler, trailing spacing, eta = 0)" if n
            else "-", "parameterization": f"{model.param} ({PARAM_TO_PREDICTION[model.param]})",
            "schedule": (f"the teacher scheduler's own betas, T = {model.schedule.T}"
                         if model.schedule.kind == "trained" else f"{model.schedule.kind}, T = {model.schedule.T}"),
            "teacher id": extra.get("teacher", "-"),
            "guidance": _guidance_text(model.net), "data set": model.dataset,
            "quality": extra.get("quality", "-"),
            "checked at export": extra.get("checked", "not checked (--check 0)")}
    lines += [f"| {k} | {v} |" for k, v in rows.items()]
    if _is_conditional(model.net):
        lines += ["", "Sample it with diffusers (a latent text-to-image pipeline; x0 is not clipped in latent space):",
                  "", "```python", "from diffusers import StableDiffusionPipeline",
                  "pipe = StableDiffusionPipeline.from_pretrained(FOLDER, safety_checker=None)",
                  f'images = pipe("a handwritten seven", num_inference_steps={n or 50}, guidance_scale=2.0, '
                  'eta=0.0).images', "```", "",
                  "or as a fastdiff model: `fastdiff.load_model(FOLDER, dataset=...)`.", ""]
        return "\n".join(lines)
    lines += ["", "Sample it with diffusers:", "", "```python", "from diffusers import DDIMPipeline",
              "pipe = DDIMPipeline.from_pretrained(FOLDER)",
              f"images = pipe(batch_size=16, num_inference_steps={n or 50}, eta=0.0,",
              "              use_clipped_model_output=True).images",
              "```", "", "`use_clipped_model_output=True` makes DDIM re-derive eps from the clipped x0, as fastdiff "
              "does (diffusers' "
              "default keeps the network's eps after clipping x0, which gives other images).", "",
              "or as a fastdiff model: `fastdiff.load_model(FOLDER)` (the `_fastdiff` block of "
              "scheduler/scheduler_config.json holds the exact schedule).", ""]
    return "\n".join(lines)


def verify(model, folder: Path, n: int) -> dict:
    """Sample `n` images three ways on fastdiff's per-index noise (seed 0) and compare: `model` itself, the folder
    reloaded by fastdiff (must be bit-identical) and the folder run by diffusers -> {"steps", "fastdiff_max_abs",
    "diffusers_rel"} (max |a - b| / max |a|). An unconditional model: DDIMScheduler.step with
    use_clipped_model_output=True. A text-conditioned latent one: StableDiffusionPipeline on fastdiff's evaluation
    prompts at guidance_scale = w = VERIFY_W (CFG for a teacher, the w input for a guided student), compared as
    decoded images in [0, 1] (the pipeline's own decoder path against fastdiff's codec: a latent-only check would miss
    a decoder that differs). A student runs its own N steps; a teacher 8 (or the largest of 4, 2, 1 dividing T: a
    trailing grid)."""
    from fastdiff.samplers import ddim, initial_noise, student_grid

    diffusers = require_diffusers()
    steps = model.steps or next(k for k in (8, 4, 2, 1) if model.schedule.T % k == 0)
    x, _ = initial_noise(range(n), model.data_shape, 0, "cpu")
    back = read_diffusers(str(folder), dataset=model.dataset)
    if _is_conditional(model.net):
        return _verify_conditional(model, back, folder, x, steps)
    pipe = diffusers.DDIMPipeline.from_pretrained(folder, low_cpu_mem_usage=False)
    pipe.scheduler.set_timesteps(steps)
    with torch.no_grad():
        ours = own_samples(model, x, steps)
        again = ddim(back["net"], x, student_grid(steps), schedule=back["schedule"], param=back["param"], clip=True).x
        y = x.clone()
        for tau in pipe.scheduler.timesteps:
            y = pipe.scheduler.step(pipe.unet(y, tau).sample, tau, y, eta=0.0,
                                    use_clipped_model_output=True).prev_sample
    return {"steps": steps, "samples": n, "fastdiff_max_abs": float((ours - again).abs().max()),
            "diffusers_rel": float((y - ours).abs().max() / ours.abs().max())}


VERIFY_W = 2.0  # the guidance weight an exported text-to-image model is checked at


def own_samples(model, x: torch.Tensor, steps: int, net=None, clip: bool = True, guidance=None) -> torch.Tensor:
    """`model`'s samples from x_T as fastdiff itself samples it: a student by the sampler its checkpoint names, on its
    own grid (fastdiff.registry); a teacher by DDIM eta = 0 on the trailing grid i/steps. `net` replaces model.net (a
    guided wrapper); `clip` clamps x0^ (pixel models); `guidance` is the sampler's CFG weight."""
    from fastdiff import registry
    from fastdiff.grids import make_grid
    from fastdiff.samplers import ddim, student_grid

    net = model.net.cpu() if net is None else net
    if getattr(model, "sampler", ""):
        ts = make_grid(model.role["grid"], steps, model.schedule)
        return registry.sampler(model.sampler).run(net, x, ts, schedule=model.schedule, param=model.param, clip=clip,
                                                   generator=None, guidance=guidance).x
    return ddim(net, x, student_grid(steps), schedule=model.schedule, param=model.param, clip=clip,
                guidance=guidance).x


def _is_conditional(net) -> bool:
    from fastdiff.models.diffusers_cond import DiffusersCondUNet

    return isinstance(net, DiffusersCondUNet)


def _verify_conditional(model, back: dict, folder: Path, x: torch.Tensor, steps: int) -> dict:
    from fastdiff.guidance import conditional, guided
    from fastdiff.samplers import ddim, student_grid
    from fastdiff.text import eval_prompt

    diffusers = require_diffusers()
    prompts = [eval_prompt(k)[0] for k in range(len(x))]

    def pair(net):
        y = net.text.tokenize(prompts)
        w = torch.full((len(x),), VERIFY_W)
        return (conditional(net, y, w), None) if net.cfg.scalar_cond else (guided(net, y, 0), VERIFY_W)

    def sample(net, schedule, param):  # the reloaded folder: DDIM on the trailing grid, as diffusers runs it
        model_fn, w = pair(net)
        return ddim(model_fn, x, student_grid(steps), schedule=schedule, param=param, clip=False, guidance=w).x

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, low_cpu_mem_usage=False, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        model_fn, w = pair(model.net.cpu())
        ours = own_samples(model, x, steps, net=model_fn, clip=False, guidance=w)  # fastdiff's own sampler for it
        again = sample(back["net"], back["schedule"], back["param"])
        images = pipe(prompt=prompts, latents=x.clone(), num_inference_steps=steps, guidance_scale=VERIFY_W,
                      eta=0.0, output_type="pt").images
        decoded = (model.codec.decode(ours) / 2 + 0.5).clamp(0, 1)  # the pipeline's postprocessing of [-1, 1]
    return {"steps": steps, "samples": len(x), "fastdiff_max_abs": float((ours - again).abs().max()),
            "diffusers_rel": float((images - decoded).abs().max() / decoded.abs().max()), "guidance": VERIFY_W}


def export(model, out_dir, extra: dict | None = None, check: int = 16) -> tuple[Path, dict | None]:
    """Write `model` (a LoadedModel of the diffusers-unet2d architecture) as a DDIMPipeline folder at `out_dir`:
    model_index.json, unet/ (safetensors), scheduler/scheduler_config.json, README.md. Written to a temporary folder
    beside it and renamed, so a failure leaves nothing behind. With `check` > 0 the written folder is reloaded and
    sampled (`verify`, `check` images) before the rename; the result goes into the model card and is returned.
    FastdiffError when the model cannot be exported exactly (another architecture; a student whose N does not
    divide T), `out_dir` exists, or the check finds a difference (fastdiff reload not bit-identical, diffusers
    more than 1e-4 relative)."""
    extra = extra or {}
    diffusers = require_diffusers()
    out = Path(out_dir)
    conditional = _is_conditional(model.net)
    if not isinstance(model.net, DiffusersUNet) and not conditional:
        raise FastdiffError(f"{model.path}: the {model.config.get('arch', 'unet')} architecture has no exact "
                            "diffusers counterpart (fastdiff's U-Net differs from UNet2DModel in GroupNorm groups, "
                            "fused qkv and time embedding): train the teacher with `python -m fastdiff.train --arch "
                            "diffusers-unet2d` (or distil a diffusers teacher): its students have its architecture")
    n, T = model.steps, model.schedule.T
    if n and T % n:
        raise FastdiffError(f"{model.path}: a {n}-step student of a T = {T} schedule: a stock DDIMScheduler "
                            f"(trailing spacing) reproduces the grid i/N only when N divides T; export a student "
                            f"whose N divides {T}, or distil from a teacher with T a multiple of N (e.g. 1024)")
    if out.exists():
        raise FastdiffError(f"{out} exists; choose a new --out folder (export never overwrites)")
    if conditional and model.codec.shift:
        raise FastdiffError(f"{model.path}: its autoencoder has shift_factor {model.codec.shift:g}, which fastdiff "
                            "decodes as z / scaling_factor + shift (as SD3-style pipelines do) but the "
                            "StableDiffusionPipeline layout ignores: the exported folder would decode other images. "
                            "Use an autoencoder without a shift (shift_factor null or 0)")
    block = {"schedule": model.schedule.to_dict(), "param": model.param, "kind": model.kind, "steps": n,
             "dataset": model.dataset, "discrete": model.net.cfg.discrete, "id": model.hash,
             "time": "diffusers timestep tau = t*T - 1"}
    sched = diffusers.DDIMScheduler.from_config(scheduler_config(model.schedule, model.param, block, conditional))
    if conditional:  # the Stable Diffusion layout: unet/, vae/, text_encoder/, tokenizer/, scheduler/
        text = model.net.text.encoder
        pipe = diffusers.StableDiffusionPipeline(vae=model.codec.vae, text_encoder=text.model, tokenizer=text.tokenizer,
                                                 unet=model.net.unet, scheduler=sched, safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = diffusers.DDIMPipeline(unet=model.net.unet, scheduler=sched)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        sc_path = tmp / "scheduler" / "scheduler_config.json"
        sc = json.loads(sc_path.read_text())
        sc["_fastdiff"] = block  # save_pretrained drops private keys: put the block back
        sc_path.write_text(json.dumps(sc, indent=2, sort_keys=True) + "\n")
        checked = verify(model, tmp, check) if check > 0 else None
        if checked and (checked["fastdiff_max_abs"] != 0 or checked["diffusers_rel"] > 1e-4):
            raise FastdiffError(f"the exported folder does not reproduce {model.path}: {checked}")
        if checked:
            extra = {**extra, "checked": f"{checked['samples']} samples, {checked['steps']} steps on fastdiff's "
                     f"per-index noise (seed 0): fastdiff reload max abs diff {checked['fastdiff_max_abs']:.3g}, "
                     f"diffusers {type(pipe).__name__} max rel diff {checked['diffusers_rel']:.3g} (float32, CPU"
                     + (f"; guidance_scale {checked['guidance']:g}, decoded images)" if conditional else ")")}
        (tmp / "README.md").write_text(model_card(model, block, extra))
        os.replace(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FastdiffError(f"cannot write {out}: {err.strerror or err}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, checked
