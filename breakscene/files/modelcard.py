"""The bundle's model card (``README.md``): tokens, base model, the settings used, and how
to load the bundle with plain diffusers, rendered by huggingface_hub's ``ModelCard`` (the
hub's own format: YAML metadata, then Markdown)."""
from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

from breakscene.config import ExtractConfig
from breakscene.files.strictjson import to_json

# (label, dotted ExtractConfig field) shown in the card beside the published value
SETTINGS = (
    ("phase 1 steps", "phase1_steps"), ("phase 1 lr", "phase1_lr"), ("phase 2 steps", "phase2_steps"),
    ("phase 2 lr", "phase2_lr"), ("phase 2 mode", "phase2_mode"), ("LoRA rank", "lora.rank"),
    ("LoRA lr", "lora.lr"), ("lambda_attn", "lambda_attn"), ("batch size", "batch_size"),
    ("prior preservation", "prior.enabled"), ("class images", "prior.num_class_images"),
    ("masked loss normalisation", "masked_loss_normalization"), ("seed", "seed"),
)

TEMPLATE = """---
{{ card_data }}
---

# Break-A-Scene concepts: {{ tokens | join(", ") }}

{% if group -%}
Made by `breakscene extract` (Break-A-Scene, Avrahami et al. 2023) from a concept group of
{{ group.images | length }} images ({{ resolution }} px; `sources/<i>/` holds each picture exactly as
trained on, with its masks); one token per label, learned from every image that shows it:

| image | sha256 | labels of its masks |
|---|---|---|
{% for im in group.images -%}
| `{{ im.name }}` | `{{ im.sha256[:12] }}` | {{ im.labels | join(", ") }} |
{% endfor %}
{% else -%}
Made by `breakscene extract` (Break-A-Scene, Avrahami et al. 2023) from `{{ image_name }}`
({{ resolution }} px, `image.png` is the picture exactly as trained on, `masks/` its masks).
{% endif %}
| token | initializer word | mask | attention IoU with its mask |
|---|---|---|---|
{% for c in concepts -%}
| `{{ c.token }}` | {{ c.init_word or "-" }} | `{{ c.mask }}` | {{ "%.3f" | format(c.attention_iou) }} |
{% endfor %}
**Base model:** `{{ model_id }}`{% if revision %} at revision `{{ revision }}`{% endif %}.
{% if preset -%}
This base is a random-weight preset of this project, not a trained model: its images are
noise. `breakscene export-base {{ model_id }} DIR` writes it as a diffusers folder
(bit-identical in every process), which is what the code below loads.
{% elif not base_loadable -%}
{{ base_note }}
{% endif %}
**Phase 2:** `{{ phase2_mode }}` ({% if lora %}LoRA adapters in `pytorch_lora_weights.safetensors`{% else %}fine-tuned `unet/` and `text_encoder/`{% if sdxl %} and `text_encoder_2/`{% endif %}{% endif %}).
{% if sdxl -%}
Token embeddings: `embeddings/` (one file per token, SDXL's textual-inversion format: `clip_l` is
the row of `text_encoder`, `clip_g` the row of `text_encoder_2`).
{%- else -%}
Token embeddings: `embeddings/` (diffusers' textual-inversion format, one file per token).
{%- endif %}

## Load with diffusers

```python
import torch
from diffusers import {{ sampler_class }}, {{ pipeline_class }}{% if not lora %}, UNet2DConditionModel
from transformers import CLIPTextModel{% if sdxl %}, CLIPTextModelWithProjection{% endif %}{% endif %}
{%- if sdxl %}
from safetensors.torch import load_file{% endif %}

bundle = {{ py.bundle_path }}  # this folder (a local copy of it)
base = {{ py.base }}  # {{ base_comment }}
{% if lora -%}
pipe = {{ pipeline_class }}.from_pretrained(base{% if revision %}, revision={{ py.revision }}{% endif %}{% if sdxl %}, add_watermarker=False{% endif %})
pipe.load_lora_weights(bundle)
{% else -%}
pipe = {{ pipeline_class }}.from_pretrained(
    base,{% if revision %} revision={{ py.revision }},{% endif %}{% if sdxl %} add_watermarker=False,{% endif %}
    unet=UNet2DConditionModel.from_pretrained(bundle, subfolder="unet"),
    text_encoder=CLIPTextModel.from_pretrained(bundle, subfolder="text_encoder"){% if sdxl %},
    text_encoder_2=CLIPTextModelWithProjection.from_pretrained(bundle, subfolder="text_encoder_2"){% endif %})
{% endif -%}
{% if sdxl -%}
# SDXL base's text_encoder_2 config says eos_token_id 2: it would pool at the new tokens
pipe.text_encoder_2.text_model.eos_token_id = pipe.tokenizer_2.eos_token_id
states = [load_file(f"{bundle}/{name}") for name in {{ py.embeddings }}]
tokens = {{ py.tokens }}
pipe.load_textual_inversion([s["clip_l"] for s in states], token=tokens,
                            text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
pipe.load_textual_inversion([s["clip_g"] for s in states], token=tokens,
                            text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
{% else -%}
pipe.load_textual_inversion([f"{bundle}/{name}" for name in {{ py.embeddings }}])
{% endif -%}
pipe.scheduler = {{ sampler_class }}.from_pretrained(bundle, subfolder="scheduler")  # the grid's sampler
pipe = pipe.to({{ py.device }})
pipe.set_progress_bar_config(disable=True)

image = pipe({{ py.example_prompt }}, num_inference_steps={{ steps }}, guidance_scale={{ guidance }},
             height={{ height }}, width={{ width }},
             generator=torch.Generator({{ py.device }}).manual_seed(0)).images[0]
image.save("example.png")
{% if grid_prompts %}
# The sample grid's images (grid.png), bit for bit: the same prompts and seeds in one call
prompts = {{ py.grid_prompts }}
seeds = {{ py.grid_seeds }}
grid_images = pipe(prompts, num_inference_steps={{ steps }}, guidance_scale={{ guidance }},
                   height={{ height }}, width={{ width }},
                   generator=[torch.Generator({{ py.device }}).manual_seed(s) for s in seeds]).images
{% endif -%}
```

One seed alone gives the same image as in the grid up to float rounding (kernels may
round differently at another batch size). {% if lora %}`cross_attention_kwargs={"scale": s}`
scales the LoRA.{% endif %}

## Settings used

Sampler{% if grid_prompts %} of `grid.png`{% endif %}: `{{ sampler_class }}` ({{ sampler_name }}), {{ steps }} steps,
guidance {{ guidance }}{% if grid_prompts %}, seeds {{ grid_seeds_unique | join(", ") }}{% endif %}.

| setting | used | published |
|---|---|---|
{% for label, used, published in settings -%}
| {{ label }} | {{ used }} | {{ published }} |
{% endfor %}
Everything else (losses, curves, timings, the attention diagnostic) is in `bundle.json`;
the attention maps are in `diagnostics/`.
"""


def _field(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def render(info: dict, *, bundle_path: str, base: str, base_comment: str) -> str:
    """The card for a bundle whose manifest is ``info``; ``bundle_path`` and ``base`` are
    what the snippet loads (a local folder or hub id)."""
    model, sampler, files = info["model"], info["sampler"], info["files"]
    used = info["config"]
    published = ExtractConfig().model_dump(mode="json")
    settings = [(label, _field(used, key), _field(published, key)) for label, key in SETTINGS]
    lora, sdxl = bool(files.get("lora")), model.get("family") == "sdxl"
    family_tags = ["stable-diffusion-xl"] if sdxl else ["stable-diffusion"]
    data = ModelCardData(library_name="diffusers", base_model=model.get("diffusers_base") if model.get("hub") else None,
                         tags=["break-a-scene", "textual-inversion", *family_tags] + (["lora"] if lora else []),
                         instance_prompt=" and ".join(info["tokens"]))
    # Python literals for the snippet (JSON strings and lists of them are valid Python)
    py = {"bundle_path": bundle_path, "base": base, "revision": model.get("revision"),
          "embeddings": files["embeddings"], "tokens": info["tokens"], "device": sampler["generator_device"],
          "example_prompt": f"a photo of {info['tokens'][0]} at the beach", "grid_prompts": sampler["prompts"],
          "grid_seeds": sampler["seeds"]}
    card = ModelCard.from_template(
        data, template_str=TEMPLATE, tokens=info["tokens"], image_name=info["image"]["name"],
        resolution=info["resolution"], concepts=info["concepts"], group=info.get("group"), model_id=model["id"],
        revision=model.get("revision"),
        preset=model.get("preset"), base_loadable=model.get("diffusers_base") is not None,
        base_note=model.get("make_base", ""), phase2_mode=info["phase2_mode"], lora=lora, sdxl=sdxl,
        pipeline_class="StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline", bundle_path=bundle_path,
        base=base, base_comment=base_comment, embeddings=files["embeddings"], sampler_class=sampler["class"],
        sampler_name=sampler["name"],
        steps=sampler["num_inference_steps"],
        guidance=sampler["guidance_scale"], height=sampler["height"], width=sampler["width"],
        grid_prompts=sampler["prompts"], grid_seeds_unique=sorted(set(sampler["seeds"])), settings=settings,
        py={k: to_json(v, ensure_ascii=False) for k, v in py.items()})
    return str(card)
