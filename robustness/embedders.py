"""Image / text embedders for the study's generation metrics, behind one interface.

``identity``: DINO ViT-B/16 (``facebook/dino-vitb16``), CLS token.
``prompt``: CLIP ViT-L/14 (``openai/clip-vit-large-patch14``), image and text towers.
``tiny``: a random-weight CLIP (a few channels, generated tokenizer) for tests: it runs
everywhere and means nothing. Any of them may be given a local folder or hub id instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

DEFAULT_IDENTITY = "facebook/dino-vitb16"
DEFAULT_PROMPT = "openai/clip-vit-large-patch14"
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]


def _pixels(images: list[Image.Image], size: int) -> torch.Tensor:
    import numpy as np

    arr = np.stack([np.asarray(i.convert("RGB").resize((size, size), Image.BICUBIC), np.float32) / 255 for i in images])
    return (torch.from_numpy(arr).permute(0, 3, 1, 2) - MEAN) / STD


class ClipEmbedder:
    """Image and text embeddings from a CLIP model (real weights or the tiny preset)."""

    def __init__(self, model, tokenizer, image_size: int) -> None:
        self.model, self.tokenizer, self.image_size = model.eval(), tokenizer, image_size

    @torch.no_grad()
    def image(self, images: list[Image.Image]) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=_pixels(images, self.image_size))
        out = getattr(out, "pooler_output", out)
        return F.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def text(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        out = self.model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
        out = getattr(out, "pooler_output", out)
        return F.normalize(out.float(), dim=-1)


class DinoEmbedder:
    def __init__(self, name: str) -> None:
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(name).eval()
        self.image_size = 224

    @torch.no_grad()
    def image(self, images: list[Image.Image]) -> torch.Tensor:
        out = self.model(pixel_values=_pixels(images, self.image_size)).last_hidden_state[:, 0]
        return F.normalize(out.float(), dim=-1)


def tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    from breakscene.models.tokenizer import build_preset_tokenizer

    tok = build_preset_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(cfg)
    return model, tok


def build_embedder(name: str):
    if name == "tiny":
        model, tok = tiny_clip()
        return ClipEmbedder(model, tok, 32)
    if "dino" in name.lower():
        return DinoEmbedder(name)
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(name)
    return ClipEmbedder(model, CLIPTokenizer.from_pretrained(name), model.config.vision_config.image_size)
