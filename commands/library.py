"""The library's commands: ``breakscene extract``, ``generate`` and ``export-base``.

Argument parsing and printing only; the work is in ``Extractor`` and ``bundle``.
"""
from __future__ import annotations

import argparse
import io
import logging
import re
import tempfile
import time
from pathlib import Path

from commands.options import show_defaults, validate_flags
from breakscene.config import (DEFAULT_MODEL, MAX_RESOLUTION, SEED_LIMIT, ExtractConfig, GenerateOptions, RuntimeConfig,
                     read_settings_file, validate_config)
from breakscene.errors import BreakSceneError
from breakscene.files.strictjson import to_json

log = logging.getLogger("breakscene")


# --smoke: the whole path in seconds on a laptop (a check of the install, not a concept)
SMOKE = {"phase1_steps": 2, "phase2_steps": 2, "grid_seeds": 0}


def add_extract_parser(sub) -> None:
    p = sub.add_parser("extract", help="learn one token per mask of an image, or per object of a concept group")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scene", action="append", default=None,
                     help="folder with img.jpg and mask0.png, mask1.png, ... (optional labels.txt: one label per "
                          "mask, also its initializer word); repeat for a concept group: the same label in several "
                          "folders is one object, learned as one token from every image that shows it")
    src.add_argument("--image", help="image path or URI (with --mask)")
    p.add_argument("--mask", action="append", default=[], help="mask path or URI; repeat per concept")
    p.add_argument("--init-token", nargs="+", default=[], metavar="WORD",
                   help="initializer word per concept, in mask order (one scene)")
    p.add_argument("--group-draw", choices=("uniform", "balanced"), default="uniform",
                   help="a concept group's step picks its image uniformly, or an object uniformly and then an "
                        "image that shows it (objects seen in few images are not drowned)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="preset (tiny, sd21-base-random, sdxl-tiny, sdxl-base-random), diffusers folder "
                        "(Stable Diffusion 1.x/2.x or XL), fsspec URI or hub id")
    p.add_argument("--revision", default=None, help="the model's hub revision (branch, tag or commit)")
    p.add_argument("--config", help="YAML file with ExtractConfig fields (flags below override it)")
    p.add_argument("--phase1-steps", type=int, help="steps training only the new token rows")
    p.add_argument("--phase2-steps", type=int, help="steps training the tokens with the UNet and text encoder")
    p.add_argument("--phase2-mode", choices=["full", "lora"],
                   help="phase 2 trains the whole UNet and text encoder (full, ~4.8 GB bundles at SD 2.1) "
                        "or LoRA adapters (lora, a few MB)")
    p.add_argument("--lambda-attn", type=float, help="weight of the cross-attention loss")
    p.add_argument("--batch-size", type=int, help="examples per training step")
    p.add_argument("--resolution", type=int, help=f"pixels a side, up to {MAX_RESOLUTION}")
    p.add_argument("--prior-preservation", action=argparse.BooleanOptionalAction, default=None,
                   help="train on class images too, so the model keeps its prior")
    p.add_argument("--class-data-dir", help="folder of class images (default: generated once and cached)")
    p.add_argument("--num-class-images", type=int, help="class images for prior preservation")
    p.add_argument("--grid-seeds", type=int, help="seeds of the bundle's sample grid; 0 writes no grid")
    p.add_argument("--smoke", action="store_true",
                   help="a quick check of the whole path: 2 + 2 steps, no prior preservation, no sample grid "
                        "(flags given beside it win)")
    p.add_argument("--seed", type=int, help=f"0 to {SEED_LIMIT - 1}")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when present)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow start, faster steps)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC convolutions in the UNet (default: on)")
    p.add_argument("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="recompute activations in backward; auto: only when the predicted peak does not fit the GPU")
    p.add_argument("--out", "--output", dest="out", required=True, help="bundle folder or URI to write")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    cfg = ExtractConfig()
    # flags left out take the config's value (published settings), shown in --help
    show_defaults(p, {**cfg.model_dump(include={"phase1_steps", "phase2_steps", "phase2_mode", "lambda_attn",
                                               "batch_size", "seed", "grid_seeds"}),
                      "prior_preservation": cfg.prior.enabled, "num_class_images": cfg.prior.num_class_images,
                      "resolution": "the model's native size"})
    p.set_defaults(func=cmd_extract)


def add_generate_parser(sub) -> None:
    from breakscene.models.schedulers import SCHEDULERS

    p = sub.add_parser("generate", help="generate images from a concept bundle")
    p.add_argument("--bundle", required=True, help="bundle folder or URI (what extract wrote)")
    p.add_argument("--prompt", required=True, help='e.g. "a photo of <asset0> at the beach"')
    p.add_argument("--negative-prompt", help="what guidance steers away from, e.g. \"blurry, low quality\"")
    p.add_argument("--num-images", type=int, default=1, help="images with seeds --seed, --seed + 1, ... in one batch")
    p.add_argument("--seed", type=int, default=0, help=f"0 to {SEED_LIMIT - 1}")
    p.add_argument("--scheduler", choices=list(SCHEDULERS),
                   help="sampler (default: the one the bundle's grid was made with)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the bundle's grid setting)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the bundle's grid setting)")
    p.add_argument("--height", type=int, help=f"pixels, a multiple of 8 up to {MAX_RESOLUTION} "
                                              "(default: the bundle's training resolution)")
    p.add_argument("--width", type=int, help=f"pixels, a multiple of 8 up to {MAX_RESOLUTION} "
                                             "(default: the bundle's training resolution)")
    p.add_argument("--lora-scale", type=float,
                   help="strength of a lora bundle's adapters: 0 the base weights, 1 as trained (default: 1)")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when present)")
    p.add_argument("--out", "--output", dest="out", required=True,
                   help="PNG file (several images are laid side by side)")
    p.add_argument("--force", action="store_true", help="replace an existing file at --out")
    p.set_defaults(func=cmd_generate)


def add_export_base_parser(sub) -> None:
    p = sub.add_parser("export-base", help="write a random-weight preset as a diffusers folder",
                       description="Write a preset (tiny, sd21-base-random, sdxl-tiny, sdxl-base-random) as "
                                   "the folder StableDiffusionPipeline (StableDiffusionXLPipeline for sdxl-*) "
                                   ".from_pretrained reads: the base that bundles trained on the preset load "
                                   "on with plain diffusers.")
    p.add_argument("preset", help="tiny, sd21-base-random, sdxl-tiny or sdxl-base-random")
    p.add_argument("out", metavar="DIR", help="folder or URI to write (new or empty)")
    p.add_argument("--force", action="store_true", help="replace an earlier export at DIR")
    p.set_defaults(func=cmd_export_base)


def config_from_args(args) -> ExtractConfig:
    # the job files' reader: bounded size, alias expansion and depth
    data = read_settings_file(args.config, "config file") if args.config else {}
    if args.smoke:  # below a config file and the explicit flags
        prior = data.get("prior") if isinstance(data.get("prior"), dict) else {}
        data = {**data, **SMOKE, "prior": {**prior, "enabled": False}}
    flat = {"phase1_steps": args.phase1_steps, "phase2_steps": args.phase2_steps,
            "phase2_mode": args.phase2_mode, "lambda_attn": args.lambda_attn, "batch_size": args.batch_size,
            "resolution": args.resolution, "seed": args.seed, "grid_seeds": args.grid_seeds}
    data.update({k: v for k, v in flat.items() if v is not None})
    if not isinstance(data.get("prior") or {}, dict):  # e.g. `prior: true`: pydantic names it below
        return validate_config(ExtractConfig, data, args.config or "command line")
    prior = dict(data.get("prior") or {})
    for key, value in (("enabled", args.prior_preservation), ("class_data_dir", args.class_data_dir),
                       ("num_class_images", args.num_class_images)):
        if value is not None:
            prior[key] = value
    if prior:
        data["prior"] = prior
    return validate_config(ExtractConfig, data, args.config or "command line")


def load_inputs(args, max_concepts: int):
    """The scene of ``--image`` / ``--mask``, or the concept group of the ``--scene`` folders
    (one folder: a group of one, exactly a scene)."""
    from breakscene.scenes.group import load_group_dirs
    from breakscene.scenes.scene import load_scene

    if not args.scene:
        return load_scene(args.image, args.mask, max_concepts)
    group = load_group_dirs(args.scene, max_concepts)
    group.draw = args.group_draw
    return group


def cmd_extract(args) -> int:
    from breakscene.models.memory import check_fits
    from breakscene.files.bundle import MARKER
    from breakscene.extraction.extractor import Extractor
    from breakscene.models.loading import pick_device
    from breakscene.files.output_checks import check_output_dir
    # Every check before any model is loaded: config, device, inputs, output, memory.
    cfg = config_from_args(args)
    device = pick_device(args.device)
    if args.image and not args.mask:
        raise BreakSceneError("--image needs at least one --mask")
    if args.scene and len(args.scene) > 1 and args.init_token:
        raise BreakSceneError("--init-token is for one scene: a concept group's labels (labels.txt) are its words")
    inputs = [*(args.scene or [args.image]), *args.mask, cfg.prior.class_data_dir]
    check_output_dir(args.out, marker=MARKER, inputs=[i for i in inputs if i], replace=args.force)
    scene = load_inputs(args, cfg.max_concepts)
    if len(args.init_token) > scene.num_concepts:
        raise BreakSceneError(f"{len(args.init_token)} --init-token words for {scene.num_concepts} masks")
    runtime = RuntimeConfig(compile=args.compile, channels_last=args.channels_last,
                            gradient_checkpointing=args.gradient_checkpointing)
    check_fits(args.model, args.revision, cfg, device, runtime)
    start = time.perf_counter()
    extractor = Extractor(args.model, args.revision, device=args.device, max_concepts=cfg.max_concepts,
                          runtime=runtime)
    result = extractor.extract(scene, cfg, out=args.out, init_words=args.init_token)
    print(f"bundle: {result.bundle_uri}")
    print(f"loss (last step): {result.final_loss:.4f}")
    for c in result.concepts:
        print(f"  {c['token']}: attention IoU {c['attention_iou']:.3f}, assigned to mask {c['assigned_mask']}")
    print(time_report(time.perf_counter() - start, result.timings))
    return 0


TIME_PARTS = (("model_load", "model load"), ("class_images", "class images"), ("prepare", "prepare"),
              ("phase1", "phase 1"), ("phase2", "phase 2"), ("diagnostic", "diagnostic"), ("grid", "grid"),
              ("bundle_write", "bundle write"))


def time_report(total: float, timings: dict) -> str:
    """Where an extraction's seconds went; "other" is what no part accounts for."""
    parts = [(label, timings[key]) for key, label in TIME_PARTS if key in timings]
    other = total - sum(sec for _, sec in parts)
    return (f"seconds: {total:.1f} (" + ", ".join(f"{label} {sec:.1f}" for label, sec in parts)
            + f", other {max(other, 0.0):.1f})")


def cmd_generate(args) -> int:
    from breakscene.files.bundle import load_bundle_pipeline
    from breakscene.extraction.generate import generate_images, labelled_grid
    from breakscene.models.schedulers import sampler_name
    from breakscene.files.storage import write_bytes

    opts = validate_flags(GenerateOptions, {k: getattr(args, k) for k in GenerateOptions.model_fields})
    from breakscene.models.loading import pick_device
    from breakscene.files.output_checks import check_output_file

    check_output_file(args.out, replace=args.force)
    pick_device(args.device)  # a bad --device is reported before the bundle is loaded
    pipe, info = load_bundle_pipeline(args.bundle, args.device, sampler=args.scheduler)
    unknown = [t for t in re.findall(r"<asset\d+>", args.prompt) if t not in info["tokens"]]
    if unknown:
        raise BreakSceneError(f"prompt uses {', '.join(unknown)}, not in this bundle ({', '.join(info['tokens'])})")
    if opts.lora_scale is not None and not info["files"].get("lora"):
        raise BreakSceneError(f"--lora-scale: bundle {args.bundle} has no LoRA (phase 2 mode {info['phase2_mode']})")
    # defaults: the settings the bundle's grid was sampled with (version 1 bundles: DDIM, 25 steps)
    recorded = info.get("sampler") or {"num_inference_steps": 25, "guidance_scale": 7.5}
    steps = opts.steps or recorded["num_inference_steps"]
    guidance = recorded["guidance_scale"] if opts.guidance_scale is None else opts.guidance_scale
    height, width = opts.height or info["resolution"], opts.width or info["resolution"]
    seeds = list(range(opts.seed, opts.seed + opts.num_images))
    images = generate_images(pipe, args.prompt, seeds, steps, guidance, height=height, width=width,
                             negative_prompt=args.negative_prompt, lora_scale=opts.lora_scale)
    out = images[0] if len(images) == 1 else labelled_grid([(args.prompt, images)], cell=(width, height))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    write_bytes(args.out, buf.getvalue())
    print(to_json({"out": args.out, "seeds": seeds, "tokens": info["tokens"], "scheduler": sampler_name(pipe.scheduler),
                      "steps": steps, "guidance_scale": guidance, "height": height, "width": width,
                      "negative_prompt": args.negative_prompt, "lora_scale": opts.lora_scale}))
    return 0


def cmd_export_base(args) -> int:
    from breakscene.errors import OutputError
    from breakscene.models.loading import load_models, load_sdxl_models
    from breakscene.files.output_checks import check_output_dir
    from breakscene.models.presets import PRESETS, SDXL_PRESETS, preset_family
    from breakscene.files.storage import exists, join, publish_dir

    marker = "model_index.json"  # diffusers writes it with every pipeline folder
    family = preset_family(args.preset)
    if family is None:
        raise BreakSceneError(f"unknown preset {args.preset!r}: presets are {', '.join([*PRESETS, *SDXL_PRESETS])}")
    if exists(join(args.out, marker)) and not args.force:
        raise OutputError(f"{args.out} already holds a diffusers folder; pass --force to replace it")
    check_output_dir(args.out, marker=marker, replace=True, what="DIR")
    load, pipeline = ((load_models, "StableDiffusionPipeline") if family == "sd"
                      else (load_sdxl_models, "StableDiffusionXLPipeline"))
    with tempfile.TemporaryDirectory(prefix="export-base-") as tmp:
        load(args.preset).save_pretrained(tmp)
        publish_dir(Path(tmp), args.out, marker)
    print(to_json({"out": args.out, "preset": args.preset, "load": f"{pipeline}.from_pretrained({args.out!r})"}))
    return 0


def add_parsers(sub) -> None:
    """The library's commands: ``extract``, ``generate``, ``export-base``."""
    add_extract_parser(sub)
    add_generate_parser(sub)
    add_export_base_parser(sub)
