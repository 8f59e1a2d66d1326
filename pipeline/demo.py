"""Inputs the demo job makes for itself: scikit-image's bundled sample photos (segmented
automatically) and generated scenes whose masks are exact by construction (given as
``mask_uris``). Deterministic, so re-running the demo finds its earlier work done."""
from __future__ import annotations

from breakscene.files.storage import exists, join, write_bytes
from breakscene.files.strictjson import to_json
from breakscene.scenes.synthetic import generated_scene, png_bytes, scene_labels

from pipeline.config import DemoInputs


def build_demo_inputs(cfg: DemoInputs, out: str) -> str:
    """Write the demo's images and manifest under OUT/inputs; return the manifest URI."""
    import skimage.data

    root = join(out, "inputs")
    manifest = join(root, "manifest.jsonl")
    lines = []
    for name in cfg.sample_photos:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ValueError(f"demo_inputs.sample_photos: scikit-image has no sample photo {name!r}")
        uri = join(root, f"{name}.png")
        if not exists(uri):
            write_bytes(uri, png_bytes(loader()))
        lines.append({"image_uri": uri, "image_id": name})
    for i in range(cfg.generated_scenes):
        image, masks = generated_scene(seed=i, size=cfg.size)
        uri = join(root, f"generated{i}", "img.png")
        mask_uris = [join(root, f"generated{i}", f"mask{k}.png") for k in range(len(masks))]
        if not exists(uri):
            for m_uri, m in zip(mask_uris, masks):
                write_bytes(m_uri, png_bytes(m))
            write_bytes(uri, png_bytes(image))
        lines.append({"image_uri": uri, "image_id": f"generated{i}", "mask_uris": mask_uris,
                      "labels": scene_labels()[: len(masks)]})
    write_bytes(manifest, "\n".join(to_json(line) for line in lines).encode() + b"\n")
    return manifest
