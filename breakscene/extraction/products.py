"""What the Extractor's stages hand to each other: a scene prepared for training, a
trained scene (its weights live in the resident models until the next reset), and the
result of one extraction. The attention diagnostic reads a trained scene."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from breakscene.errors import StaleSceneError
from breakscene.extraction.groups import GroupTensors
from breakscene.method.attention import token_maps
from breakscene.config import ExtractConfig
from breakscene.models.resident import ResidentModels
from breakscene.scenes.scene import PreparedScene, Scene
from breakscene.extraction.tensors import ClassTensors, SceneTensors
from breakscene.method.tokens import AssetTokens
from breakscene.method.training import PhaseResult, autocast_context


@dataclass
class PreparedExtraction:
    """Stage 1 (``Extractor.prepare``): inputs checked, token rows initialised, latents cached."""

    scene: Scene
    config: ExtractConfig
    resolution: int
    inputs: PreparedScene  # the image and masks exactly as trained on
    tensors: SceneTensors
    class_tensors: ClassTensors | None  # with prior preservation
    init_words: list[str | None]  # the initializer word each token started from (None: a vocabulary row)
    timings: dict[str, float]
    group: PreparedGroup | None = None  # a concept group: every image; ``scene`` etc. are its first

    @property
    def num_concepts(self) -> int:
        """Tokens learned: one per mask of a scene, one per label of a group."""
        return len(self.init_words)


@dataclass
class PreparedGroup:
    """Every image of a concept group as trained on, and which token each mask teaches."""

    scenes: list[Scene]
    inputs: list[PreparedScene]
    labels: list[str]  # per token
    tensors: GroupTensors

    def sources(self, token: int) -> list[tuple[int, int]]:
        """(image, mask) pairs ``token`` is learned from."""
        return [(j, i) for j, tokens in enumerate(self.tensors.token_of) for i, t in enumerate(tokens) if t == token]


@dataclass
class TrainedScene:
    """Stage 2 (``Extractor.train``): the trained weights are the resident models' own, so a
    trained scene is valid until the Extractor's next ``reset`` (or ``prepare``): after
    that, reading its models raises ``StaleSceneError`` instead of silently giving the
    base model's (or the next scene's) weights."""

    prepared: PreparedExtraction
    resident: ResidentModels
    assets: AssetTokens
    phases: dict[str, PhaseResult]  # "phase1", "phase2"
    runtime: dict  # how it ran: checkpointing per phase, the runtime levers, peak memory
    generation: int = -1  # the resident models' reset count when it was trained

    def __post_init__(self) -> None:
        if self.generation < 0:
            self.generation = self.resident.generation

    def check_current(self) -> None:
        if self.resident.generation != self.generation:
            raise StaleSceneError(f"this trained scene ({self.prepared.scene.image_name}) was reset: its weights are "
                                  "gone; export or sample a trained scene before the next reset or prepare")

    @property
    def config(self) -> ExtractConfig:
        return self.prepared.config

    @property
    def tensors(self) -> SceneTensors:
        return self.prepared.tensors

    @property
    def num_concepts(self) -> int:
        return self.prepared.num_concepts

    @property
    def tokens(self) -> list[str]:
        return self.assets.names[: self.num_concepts]

    @property
    def models(self):
        self.check_current()
        return self.resident.models

    @property
    def device(self) -> torch.device:
        return self.resident.device

    def pipeline(self, sampler: str = "ddim"):
        self.check_current()
        return self.resident.pipeline(sampler)

    @torch.no_grad()
    def attention_maps(self, tensors: SceneTensors | None = None, tokens: tuple[int, ...] | None = None) -> torch.Tensor:
        """(n, h, w): each token's map for the prompt naming ``tokens`` (default: all of them),
        averaged over the fixed diagnostic timesteps and noise seed, on the unflipped mean
        latent of ``tensors`` (default: the scene's; a group's other images pass theirs)."""
        cfg, dev = self.config, self.device
        data = tensors or self.tensors
        tokens = tuple(range(self.num_concepts)) if tokens is None else tokens
        n = len(tokens)
        m, store = self.models, self.resident.store
        ids, positions = self.assets.encode_subset(tokens)
        latents = data.latent_mean[0]
        gen = torch.Generator(device=dev).manual_seed(cfg.diagnostic_seed)
        noise = torch.randn(latents.shape, generator=gen, device=dev)
        states, added = self.resident.backbone.encode_ids(ids, tuple(latents.shape[-2:]))
        total = torch.zeros(n, *data.attn_size, device=dev)
        store.enabled = True
        for t in cfg.diagnostic_timesteps:
            ts = torch.tensor([t], device=dev)
            store.clear()
            with autocast_context(dev, cfg.mixed_precision):
                m.unet(m.scheduler.add_noise(latents, noise, ts), ts, states, added_cond_kwargs=added)
            total += token_maps(store.mean_map(), 0, positions, data.attn_size).float()
        return total / len(cfg.diagnostic_timesteps)


@dataclass
class ExtractionResult:
    tokens: list[str]
    concepts: list[dict]
    losses: dict
    timings: dict
    image_hash: str
    bundle_uri: str | None = None
    grid_uri: str | None = None
    attention_maps: np.ndarray | None = field(default=None, repr=False)
    evaluation: dict | None = None  # what the ``evaluate`` hook returned
    runtime: dict = field(default_factory=dict)  # how it ran: checkpointing per phase, peak memory
    group: list[dict] | None = None  # a concept group's images: each one's tokens and diagnostics

    @property
    def final_loss(self) -> float | None:
        for phase in ("phase2", "phase1"):
            if "total" in self.losses.get(phase, {}):
                return self.losses[phase]["total"]["last"]
        return None
