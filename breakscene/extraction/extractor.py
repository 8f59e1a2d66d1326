"""The Extractor: models loaded once, many scenes in a row, each from pristine weights.

Its stages, in the way Segment Anything's predictor has ``set_image`` then ``predict``:
``prepare(scene, config)`` checks the inputs, initialises the asset tokens and caches image
and class latents; ``train(prepared)`` runs phase 1 (token embeddings only) and phase 2
(full UNet + text encoder, or LoRA); ``diagnose(trained)`` measures each token's attention
against its mask; ``export(trained, result, uri)`` writes the bundle; ``reset()`` returns to
the pristine base model. ``extract`` runs them in order.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from breakscene.files.bundle import write_bundle
from breakscene.config import ExtractConfig, RuntimeConfig
from breakscene.errors import BreakSceneError, SceneError
from breakscene.extraction.groups import GroupTensors, draw_group_batch, image_reference_masks
from breakscene.extraction.products import ExtractionResult, PreparedExtraction, PreparedGroup, TrainedScene
from breakscene.models.memory import GIB
from breakscene.method.diagnostics import attention_diagnostic
from breakscene.method.phases import PHASES
from breakscene.method.prior import class_images, to_pixels
from breakscene.models.resident import ResidentModels
from breakscene.scenes.group import SceneGroup
from breakscene.scenes.scene import Scene, prepare_scene
from breakscene.extraction.tensors import ClassTensors, class_tensors, draw_batch, scene_tensors
from breakscene.method.tokens import AssetTokens
from breakscene.method.training import RUNTIME_OPTIMIZERS, run_phase, training_step

__all__ = ["ExtractionResult", "Extractor", "PreparedExtraction", "TrainedScene"]


class Extractor:
    def __init__(self, model: str = "tiny", revision: str | None = None, device: str | None = None,
                 max_concepts: int = 4, progress: bool = True, runtime: RuntimeConfig | None = None) -> None:
        start = time.perf_counter()
        self.resident = ResidentModels(model, revision, device, runtime)
        m = self.resident.models
        self.assets = AssetTokens(m.tokenizers, m.text_encoders, max_concepts, self.resident.device, model_id=model)
        self.max_concepts = max_concepts
        self.progress = progress
        # class images' latents per (folder, prompt, count, steps, resolution): one generation per process
        self.class_cache: dict[tuple, ClassTensors] = {}
        self.load_seconds = time.perf_counter() - start

    @property
    def models(self):
        return self.resident.models

    @property
    def device(self) -> torch.device:
        return self.resident.device

    @property
    def runtime(self) -> RuntimeConfig:
        return self.resident.runtime

    @property
    def store(self):
        """Where the capture processors put the loss layers' attention maps."""
        return self.resident.store

    @property
    def tokens(self) -> list[str]:
        return self.assets.names

    def pipeline(self, sampler: str = "ddim"):
        """A generation pipeline over the current in-memory weights (trained until ``reset``)."""
        return self.resident.pipeline(sampler)

    def reset(self) -> None:
        """Back to the pristine base model, without reading anything from disk."""
        self.resident.reset()
        self.assets.reset()

    # -- stage 1 -----------------------------------------------------------------------
    def check_resolution(self, resolution: int, attn_downsample: int) -> None:
        vae_scale = self.models.vae_scale
        multiple = max(2 ** (len(self.models.unet.down_blocks) - 1), attn_downsample)
        if resolution % vae_scale or (resolution // vae_scale) % multiple:
            raise BreakSceneError(f"resolution {resolution} must be a multiple of {vae_scale * multiple}"
                                  f" for model {self.models.model_id!r}")

    def prepare(self, scene: Scene | SceneGroup, config: ExtractConfig | None = None,
                init_words: list[str | None] | None = None) -> PreparedExtraction:
        """Check ``scene`` against ``config``, start from pristine weights, initialise one token
        per mask (from ``init_words`` where given) and cache the latents training reads. A
        concept group of several images (``SceneGroup``) learns one token per label; a
        group of one image is that scene (its labels, if any, are its initializer words)."""
        if isinstance(scene, SceneGroup):
            if len(scene.scenes) > 1:
                return prepare_group(self, scene, config)
            scene, init_words = scene.scenes[0], scene.labels[0] or init_words
        cfg = config or ExtractConfig()
        resolution = self.start_scene(cfg, scene.num_concepts, scene.image_name)
        clock = time.perf_counter()
        inputs = prepare_scene(scene, resolution)
        words = self.assets.init_rows(scene.num_concepts, init_words)
        tensors = scene_tensors(self.models.vae, inputs, cfg.attn_downsample, self.device)
        timings = {"prepare": round(time.perf_counter() - clock, 3)}
        cls = self.timed_class_tensors(cfg, resolution, timings)
        return PreparedExtraction(scene=scene, config=cfg, resolution=resolution, inputs=inputs, tensors=tensors,
                                  class_tensors=cls, init_words=words, timings=timings)

    def start_scene(self, cfg: ExtractConfig, n: int, name: str) -> int:
        """Checks before a scene's work (token count, resolution), then pristine weights; the resolution."""
        limit = min(cfg.max_concepts, self.max_concepts)
        if n > limit:
            raise SceneError(f"{name} has {n} masks, more than max_concepts={limit}")
        resolution = cfg.resolution or self.models.native_resolution
        self.check_resolution(resolution, cfg.attn_downsample)
        self.reset()
        self.resident.use_capture(cfg.attn_downsample)
        return resolution

    def timed_class_tensors(self, cfg: ExtractConfig, resolution: int, timings: dict) -> ClassTensors | None:
        clock = time.perf_counter()
        cls = self.class_tensors(cfg, resolution) if cfg.prior.enabled else None
        timings["class_images"] = round(time.perf_counter() - clock, 3)
        return cls

    def class_tensors(self, cfg: ExtractConfig, resolution: int) -> ClassTensors:
        """Prior preservation's class latents: generated (or read) once per setting, then cached."""
        p = cfg.prior
        key = (p.class_data_dir, p.class_prompt, p.num_class_images, p.generation_steps, resolution)
        if key not in self.class_cache:
            pixels = to_pixels(class_images(self.models, p, resolution, self.progress))
            self.class_cache[key] = class_tensors(self.models.vae, pixels, self.assets.ids_for_text(p.class_prompt),
                                                  self.device)
        return self.class_cache[key]

    # -- stage 2 -----------------------------------------------------------------------
    def step_fn(self, prepared: PreparedExtraction) -> Callable:
        """One training step of ``prepared`` per call, its random draws seeded by its config."""
        cfg, m = prepared.config, self.models
        rng = random.Random(cfg.seed)
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        timesteps = m.scheduler.config.num_train_timesteps

        # a group's step draws its image first; a scene's is the group-of-one case, without that draw
        draw = partial(draw_group_batch, prepared.group.tensors) if prepared.group else partial(
            draw_batch, prepared.tensors)

        def step():
            batch = draw(prepared.class_tensors, cfg, rng=rng, gen=gen, encode_subset=self.assets.encode_subset,
                         num_train_timesteps=timesteps)
            return training_step(m.unet, m.text_encoder, m.scheduler, self.resident.store, batch, cfg,
                                 backbone=self.resident.backbone)
        return step

    def train(self, prepared: PreparedExtraction) -> TrainedScene:
        """Phase 1 (the new token rows), then phase 2 (``full`` or ``lora``), on the resident models."""
        cfg, resident = prepared.config, self.resident
        step = self.step_fn(prepared)
        resident.set_training(True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        checkpointing, results = {}, {}
        for phase, steps, name in zip(PHASES, (cfg.phase1_steps, cfg.phase2_steps),
                                      ("phase 1", f"phase 2 ({cfg.phase2_mode})")):
            # decided before the adapters exist: the prediction adds its own to a meta copy
            checkpointing[phase] = resident.wants_checkpointing(phase, cfg, prepared.resolution)
            setup = resident.phase_setup(phase, cfg, after_step=self.assets.keep_only_new_rows(prepared.num_concepts))
            resident.set_checkpointing(checkpointing[phase])
            results[phase] = run_phase(name, steps, setup, step, cfg=cfg, device=self.device, progress=self.progress,
                                       optimizer=RUNTIME_OPTIMIZERS[self.runtime.optimizer])
        resident.set_training(False)
        runtime = {"gradient_checkpointing": checkpointing,
                   **self.runtime.model_dump(exclude={"gradient_checkpointing"})}
        if self.device.type == "cuda":
            runtime["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(self.device) / GIB, 3)
        return TrainedScene(prepared=prepared, resident=resident, assets=self.assets, phases=results, runtime=runtime)

    # -- stages 3 and 4 ----------------------------------------------------------------
    def diagnose(self, trained: TrainedScene) -> ExtractionResult:
        """Each token's attention map against every mask (``metrics.attention_diagnostic``)."""
        prepared, cfg, data = trained.prepared, trained.config, trained.tensors
        clock = time.perf_counter()
        per_image = None
        if prepared.group:  # each image's tokens against its own masks
            diag, per_image, image_maps = group_diagnostics(trained, cfg.diagnostic_threshold)
            maps = image_maps[0]
        else:
            maps = trained.attention_maps().cpu().numpy()
            diag = attention_diagnostic(maps, image_reference_masks(data), cfg.diagnostic_threshold)
        p1, p2 = trained.phases["phase1"], trained.phases["phase2"]
        timings = {"model_load": round(self.load_seconds, 3), **prepared.timings,
                   "phase1": round(p1.seconds, 3), "phase2": round(p2.seconds, 3),
                   "diagnostic": round(time.perf_counter() - clock, 3)}
        concepts = [{"index": i, "token": trained.tokens[i], "init_word": prepared.init_words[i], **d}
                    for i, d in enumerate(diag)]
        if prepared.group:  # which object each token is, and the masks it was learned from
            label_concepts(concepts, prepared.group)
        return ExtractionResult(tokens=trained.tokens, concepts=concepts,
                                losses={"phase1": p1.summary(), "phase2": p2.summary()}, timings=timings,
                                image_hash=prepared.scene.image_hash, attention_maps=maps, runtime=trained.runtime,
                                group=per_image)

    def export(self, trained: TrainedScene, result: ExtractionResult, uri: str) -> None:
        """The bundle at ``uri`` (``bundle.write_bundle``); its sample grid is timed on its own."""
        clock = time.perf_counter()
        write_bundle(uri, trained, result)
        result.timings["bundle_write"] = round(time.perf_counter() - clock - result.timings.get("grid", 0.0), 3)

    # -- the whole extraction ----------------------------------------------------------
    def extract(self, scene: Scene | SceneGroup, config: ExtractConfig | None = None, out: str | None = None,
                init_words: list[str | None] | None = None,
                evaluate: Callable[[TrainedScene], dict] | None = None) -> ExtractionResult:
        """Learn one token per mask of ``scene`` (per label of a ``SceneGroup``); write a bundle
        to ``out`` when given.

        ``evaluate(trained)``, when given, runs on the trained weights before they are reset
        (the robustness study measures through it); its answer is ``result.evaluation``."""
        try:
            # 1. inputs checked, tokens initialised, image and class latents cached
            prepared = self.prepare(scene, config, init_words)
            # 2. phase 1 (token rows), phase 2 (full or LoRA)
            trained = self.train(prepared)
            # 3. attention diagnostic against every mask
            result = self.diagnose(trained)
            # 4. the caller's own measurements on the trained weights
            if evaluate is not None:
                clock = time.perf_counter()
                result.evaluation = evaluate(trained)
                result.timings["evaluate"] = round(time.perf_counter() - clock, 3)
            # 5. the bundle
            if out is not None:
                self.export(trained, result, out)
            return result
        finally:
            # 6. pristine weights for the next scene, whatever happened
            self.reset()


# -- concept groups (breakscene/extraction/groups.py draws their steps) -----------------

def group_diagnostics(trained, threshold: float) -> tuple[list[dict], list[dict], list[np.ndarray]]:
    """The attention diagnostic in every image of a group: each image's tokens against its
    own masks. Returns (per token: the diagnostic in the first image that shows it, with
    that image's index; per image: its name, tokens and diagnostics; per image: its maps)."""
    group = trained.prepared.group
    per_token: dict[int, dict] = {}
    per_image, maps = [], []
    for j, (data, tokens) in enumerate(zip(group.tensors.images, group.tensors.token_of)):
        image_maps = trained.attention_maps(data, tokens).cpu().numpy()
        diag = attention_diagnostic(image_maps, image_reference_masks(data), threshold)
        maps.append(image_maps)
        per_image.append({"image": group.scenes[j].image_name, "sha256": group.scenes[j].image_hash,
                          "tokens": [trained.tokens[t] for t in tokens],
                          "concepts": [{"token": trained.tokens[t], "mask_index": i, **d}
                                       for i, (t, d) in enumerate(zip(tokens, diag))]})
        for i, (t, d) in enumerate(zip(tokens, diag)):
            per_token.setdefault(t, {**d, "image_index": j, "mask_index": i})
    return [per_token[t] for t in range(len(trained.tokens))], per_image, maps


def prepare_group(extractor, group, config: ExtractConfig | None = None):
    """``Extractor.prepare`` for a concept group of several images: every image cached, one
    token per label (the label is its initializer word)."""
    cfg = config or ExtractConfig()
    resolution = extractor.start_scene(cfg, group.num_concepts, f"the group of {group.scenes[0].image_name}")
    clock = time.perf_counter()
    inputs = [prepare_scene(s, resolution) for s in group.scenes]
    words = extractor.assets.init_rows(group.num_concepts, group.tokens)
    images = [scene_tensors(extractor.models.vae, x, cfg.attn_downsample, extractor.device) for x in inputs]
    tensors = GroupTensors(images, group.token_of(), group.draw)
    timings = {"prepare": round(time.perf_counter() - clock, 3)}
    cls = extractor.timed_class_tensors(cfg, resolution, timings)
    return PreparedExtraction(scene=group.scenes[0], config=cfg, resolution=resolution, inputs=inputs[0],
                              tensors=images[0], class_tensors=cls, init_words=words, timings=timings,
                              group=PreparedGroup(group.scenes, inputs, group.tokens, tensors))


def label_concepts(concepts: list[dict], group) -> None:
    """Each concept's label and the (image, mask) pairs it was learned from."""
    for c in concepts:
        c.update(label=group.labels[c["index"]], sources=[list(pair) for pair in group.sources(c["index"])])
