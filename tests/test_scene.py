import numpy as np
import pytest
from PIL import Image

from breakscene.errors import SceneError
from breakscene.scene import load_scene, load_scene_dir, prepare_scene
from conftest import write_scene


def test_example_scene_loads(examples):
    scene = load_scene_dir(examples / "bear")
    assert scene.num_concepts == 3
    assert scene.masks.shape == (3, 512, 512)
    # foreground fractions from the examples' README
    assert np.allclose(scene.masks.mean(axis=(1, 2)), [0.052, 0.030, 0.290], atol=0.002)
    assert len(scene.image_hash) == 64


def test_prepare_crops_centre_square_and_keeps_masks_aligned(tmp_path):
    # 96x64 image: the centre square is x in [16, 80); box 0 is x 10..40, y 10..40
    folder = write_scene(tmp_path / "s")
    scene = load_scene_dir(folder)
    prep = prepare_scene(scene, 32)
    assert prep.pixels.shape == (3, 32, 32) and prep.masks.shape == (2, 32, 32)
    assert prep.pixels.min() >= -1 and prep.pixels.max() <= 1
    # box 0 after the crop: x 0..24, y 10..40 of 64 -> scaled by 1/2: x 0..12, y 5..20
    m0 = prep.masks[0].numpy().astype(bool)
    ys, xs = np.nonzero(m0)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (0, 11, 5, 19)
    # pixels inside the mask are the box colour (red), outside grey
    red = prep.pixels[0][m0].mean().item()
    assert red > 0.5


def test_wrong_size_mask_is_resized_with_warning(tmp_path):
    folder = write_scene(tmp_path / "s")
    Image.open(folder / "mask1.png").resize((48, 32), Image.NEAREST).save(folder / "mask1.png")
    scene = load_scene_dir(folder)
    assert scene.masks.shape == (2, 64, 96)
    assert any("mask1.png is 48x32 but its image is 96x64" in w for w in scene.warnings)


@pytest.mark.parametrize("case, message", [
    ("missing_image", "does not exist"),
    ("corrupt_image", "cannot be decoded"),
    ("empty_mask", "is empty"),
    ("not_binary", "does not binarise"),
    ("missing_mask", "does not exist"),
    ("too_many", "more than max_concepts=2"),
])
def test_bad_input_names_the_file(tmp_path, case, message):
    folder = write_scene(tmp_path / "s")
    image, masks = str(folder / "img.png"), [str(folder / "mask0.png"), str(folder / "mask1.png")]
    if case == "missing_image":
        image = str(folder / "nope.png")
    elif case == "corrupt_image":
        (folder / "img.png").write_bytes(b"\x89PNG not really")
    elif case == "empty_mask":
        Image.fromarray(np.zeros((64, 96), np.uint8)).save(masks[1])
    elif case == "not_binary":
        Image.fromarray(np.tile(np.linspace(0, 255, 96).astype(np.uint8), (64, 1))).save(masks[1])
    elif case == "missing_mask":
        masks[1] = str(folder / "mask9.png")
    elif case == "too_many":
        masks = masks + masks[:1]
    with pytest.raises(SceneError, match=message) as err:
        load_scene(image, masks, max_concepts=2)
    if case in ("missing_image", "corrupt_image"):
        assert image in str(err.value)
    if case in ("empty_mask", "not_binary", "missing_mask"):
        assert masks[1] in str(err.value)


def test_mask_outside_the_centre_square_is_rejected(tmp_path):
    folder = write_scene(tmp_path / "s", size=(200, 50), boxes=((0, 0, 20, 50), (80, 0, 120, 50)))
    scene = load_scene_dir(folder)
    with pytest.raises(SceneError, match="mask0.png lies outside the centre square"):
        prepare_scene(scene, 32)


def test_scene_folder_errors(tmp_path):
    with pytest.raises(SceneError, match="does not exist"):
        load_scene_dir(tmp_path / "none")
    (tmp_path / "e").mkdir()
    with pytest.raises(SceneError, match="no img.jpg"):
        load_scene_dir(tmp_path / "e")
