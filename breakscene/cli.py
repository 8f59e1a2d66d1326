"""The library's commands: ``breakscene extract`` and ``breakscene generate``.

Argument parsing and printing only; the work is in ``Extractor`` and ``bundle``.
The console script (``pipeline.cli:main``) adds the pipeline's commands beside these.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import re
import sys
import time

from .config import ExtractConfig, RuntimeConfig
from .errors import BreakSceneError

log = logging.getLogger("breakscene")


def add_extract_parser(sub) -> None:
    p = sub.add_parser("extract", help="learn one token per mask of a single image")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scene", help="folder with img.jpg and mask0.png, mask1.png, ...")
    src.add_argument("--image", help="image path or URI (with --mask)")
    p.add_argument("--mask", action="append", default=[], help="mask path or URI; repeat per concept")
    p.add_argument("--init-token", nargs="+", default=[], metavar="WORD",
                   help="initializer word per concept, in mask order")
    p.add_argument("--model", default="stabilityai/stable-diffusion-2-1-base",
                   help="preset (tiny, sd21-base-random), diffusers folder, fsspec URI or hub id")
    p.add_argument("--revision", default=None)
    p.add_argument("--config", help="YAML file with ExtractConfig fields (flags below override it)")
    p.add_argument("--phase1-steps", type=int)
    p.add_argument("--phase2-steps", type=int)
    p.add_argument("--phase2-mode", choices=["full", "lora"])
    p.add_argument("--lambda-attn", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--resolution", type=int)
    p.add_argument("--prior-preservation", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--class-data-dir")
    p.add_argument("--num-class-images", type=int)
    p.add_argument("--grid-seeds", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when present)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow start, faster steps)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC convolutions in the UNet (default: on)")
    p.add_argument("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="recompute activations in backward; auto: only when the predicted peak does not fit the GPU")
    p.add_argument("--out", required=True, help="bundle folder or URI to write")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p.set_defaults(func=cmd_extract)


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate images from a concept bundle")
    p.add_argument("--bundle", required=True)
    p.add_argument("--prompt", required=True, help='e.g. "a photo of <asset0> at the beach"')
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--device")
    p.add_argument("--out", required=True, help="PNG file (several images are laid side by side)")
    p.set_defaults(func=cmd_generate)


def config_from_args(args) -> ExtractConfig:
    import yaml

    data: dict = {}
    if args.config:
        try:
            with open(args.config) as fh:
                data = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise BreakSceneError(f"config file {args.config} cannot be read: {exc}") from None
    flat = {"phase1_steps": args.phase1_steps, "phase2_steps": args.phase2_steps,
            "phase2_mode": args.phase2_mode, "lambda_attn": args.lambda_attn, "batch_size": args.batch_size,
            "resolution": args.resolution, "seed": args.seed, "grid_seeds": args.grid_seeds}
    data.update({k: v for k, v in flat.items() if v is not None})
    prior = dict(data.get("prior") or {})
    for key, value in (("enabled", args.prior_preservation), ("class_data_dir", args.class_data_dir),
                       ("num_class_images", args.num_class_images)):
        if value is not None:
            prior[key] = value
    if prior:
        data["prior"] = prior
    return validate_config(ExtractConfig, data, args.config or "command line")


def validate_config(model, data: dict, where: str):
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise BreakSceneError(f"invalid configuration in {where}: {problems}") from None


def cmd_extract(args) -> int:
    from .bundle import is_complete
    from .extractor import Extractor
    from .scene import load_scene, load_scene_dir

    cfg = config_from_args(args)
    if is_complete(args.out) and not args.force:
        raise BreakSceneError(f"{args.out} already holds a bundle; pass --force to replace it")
    if args.scene:
        scene = load_scene_dir(args.scene, cfg.max_concepts)
    else:
        if not args.mask:
            raise BreakSceneError("--image needs at least one --mask")
        scene = load_scene(args.image, args.mask, cfg.max_concepts)
    if len(args.init_token) > scene.num_concepts:
        raise BreakSceneError(f"{len(args.init_token)} --init-token words for {scene.num_concepts} masks")
    start = time.perf_counter()
    runtime = RuntimeConfig(compile=args.compile, channels_last=args.channels_last,
                            gradient_checkpointing=args.gradient_checkpointing)
    extractor = Extractor(args.model, args.revision, device=args.device, max_concepts=cfg.max_concepts,
                          runtime=runtime)
    result = extractor.extract(scene, cfg, out=args.out, init_words=args.init_token)
    print(f"bundle: {result.bundle_uri}")
    print(f"loss (last step): {result.final_loss:.4f}")
    for c in result.concepts:
        print(f"  {c['token']}: attention IoU {c['attention_iou']:.3f}, assigned to mask {c['assigned_mask']}")
    print(f"seconds: {time.perf_counter() - start:.1f} "
          f"(phase 1 {result.timings['phase1']:.1f}, phase 2 {result.timings['phase2']:.1f})")
    return 0


def cmd_generate(args) -> int:
    from .bundle import load_bundle_pipeline
    from .generate import generate_images, labelled_grid
    from .storage import write_bytes

    if args.num_images < 1:
        raise BreakSceneError("--num-images must be at least 1")
    pipe, info = load_bundle_pipeline(args.bundle, args.device)
    unknown = [t for t in re.findall(r"<asset\d+>", args.prompt) if t not in info["tokens"]]
    if unknown:
        raise BreakSceneError(f"prompt uses {', '.join(unknown)}, not in this bundle ({', '.join(info['tokens'])})")
    seeds = list(range(args.seed, args.seed + args.num_images))
    images = generate_images(pipe, args.prompt, seeds, args.steps, args.guidance_scale, info["resolution"])
    out = images[0] if len(images) == 1 else labelled_grid([(args.prompt, images)], cell=images[0].width)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    write_bytes(args.out, buf.getvalue())
    print(json.dumps({"out": args.out, "seeds": seeds, "tokens": info["tokens"]}))
    return 0


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except BreakSceneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="breakscene", description="Break-A-Scene at scale: single scenes, pipeline jobs, robustness reports.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_extract_parser(sub)
    add_generate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)
