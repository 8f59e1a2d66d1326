import numpy as np
import pytest
from PIL import Image

from breakscene.errors import SceneError
from breakscene.scenes.scene import load_scene, load_scene_dir, prepare_scene
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


# --- images as people see them (issue 9) -----------------------------------

def _displayed_scene(tmp_path):
    """A 96x64 picture as displayed: a red box at x 10..40, y 10..40, and its mask."""
    shown = np.full((64, 96, 3), 128, np.uint8)
    shown[10:40, 10:40] = (220, 30, 30)
    mask = np.zeros((64, 96), np.uint8)
    mask[10:40, 10:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask0.png")
    return shown


def test_exif_orientation_is_applied_before_the_masks(tmp_path):
    shown = _displayed_scene(tmp_path)
    # a phone stores the pixels sideways and says "rotate 90 degrees clockwise" (Orientation 6)
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "img.png", exif=exif)
    assert stored.size == (64, 96)
    scene = load_scene(str(tmp_path / "img.png"), [str(tmp_path / "mask0.png")])
    assert scene.image.size == (96, 64) and not scene.warnings  # no "resized" mask
    pixels = np.asarray(scene.image)
    assert (pixels[scene.masks[0]] == (220, 30, 30)).all()
    assert (pixels[~scene.masks[0]] == 128).all()


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_depth_photos_are_scaled_not_clipped(tmp_path, mode):
    from breakscene.scenes.scene import decode_image

    ramp = np.tile(np.linspace(0, 1, 96), (64, 1))
    if mode == "F":
        Image.fromarray(ramp.astype(np.float32), "F").save(tmp_path / "img.tif")
        data = (tmp_path / "img.tif").read_bytes()
    else:
        arr = np.round(ramp * 65535).astype(np.uint16 if mode == "I;16" else np.int32)
        img = Image.fromarray(arr.astype(np.uint16)) if mode == "I;16" else Image.fromarray(arr, "I")
        path = tmp_path / ("img.png" if mode == "I;16" else "img.tif")  # 16-bit PNG; 32-bit TIFF
        img.save(path)
        assert Image.open(path).mode == mode
        data = path.read_bytes()
    rgb = np.asarray(decode_image(data, "img"))
    expected = np.round(ramp * 255)
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1  # a ramp, not all white
    assert (rgb[..., 0] == rgb[..., 2]).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_dropped_transparency_is_a_warning(tmp_path, mode):
    from breakscene.scenes.scene import decode_image

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = (0, 200, 0)
    rgba[:, :16, 3] = 255  # left half opaque
    img = Image.fromarray(rgba, "RGBA")
    img = img.convert("LA") if mode == "LA" else img.convert("P") if mode == "P" else img
    if mode == "P":  # palette index 0 transparent
        img = Image.fromarray(np.where(rgba[..., 3] > 0, 1, 0).astype(np.uint8), "P")
        img.putpalette([0, 0, 0, 0, 200, 0])
        img.info["transparency"] = 0
    img.save(tmp_path / "img.png")
    warnings = []
    rgb = decode_image((tmp_path / "img.png").read_bytes(), "img.png", warnings)
    assert rgb.mode == "RGB" and rgb.size == (32, 32)
    assert len(warnings) == 1 and "img.png has transparency: alpha dropped" in warnings[0]
    opaque = np.asarray(rgb)[:, :16]
    assert opaque[..., 1].min() > 100  # the opaque pixels keep their colour


def test_cmyk_and_an_unusable_colour_profile(tmp_path):
    from breakscene.scenes.scene import decode_image

    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    warnings = []
    rgb = np.asarray(decode_image((tmp_path / "cmyk.jpg").read_bytes(), "cmyk.jpg", warnings))
    assert rgb[..., 0].min() > 200 and rgb[..., 1].max() < 60 and not warnings
    Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / "icc.png", icc_profile=b"not a profile")
    rgb = decode_image((tmp_path / "icc.png").read_bytes(), "icc.png", warnings)
    assert np.asarray(rgb)[0, 0].tolist() == [10, 20, 30]
    assert len(warnings) == 1 and "icc.png: its colour profile could not be applied" in warnings[0]


def test_decompression_bomb_is_named_with_its_size(tmp_path, monkeypatch):
    from breakscene.scenes.scene import decode_image

    # a real bomb under PIL's default limit: 196 million pixels in a few kilobytes
    Image.new("1", (14000, 14000)).save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    with pytest.raises(SceneError, match=r"bomb.png has 196000000 pixels, over the limit 89478485"):
        load_scene(str(tmp_path / "bomb.png"), [str(tmp_path / "bomb.png")])
    # the limit is configurable, both below and above PIL's own
    Image.new("RGB", (96, 64)).save(tmp_path / "small.png")
    monkeypatch.setenv("BREAKSCENE_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(SceneError, match="small.png has 6144 pixels, over the limit 1000"):
        decode_image((tmp_path / "small.png").read_bytes(), "small.png")
    monkeypatch.setenv("BREAKSCENE_MAX_IMAGE_PIXELS", "0")
    assert decode_image((tmp_path / "small.png").read_bytes(), "small.png").size == (96, 64)


def test_decode_errors_have_no_object_reprs(tmp_path):
    (tmp_path / "img.png").write_bytes(b"not an image at all")
    with pytest.raises(SceneError) as err:
        load_scene(str(tmp_path / "img.png"), [str(tmp_path / "img.png")])
    assert "img.png cannot be decoded" in str(err.value) and " at 0x" not in str(err.value)


def test_gif_is_refused_by_extract_and_the_pipeline_alike(tmp_path):
    import pipeline.stages
    from breakscene.scenes.scene import SUPPORTED_FORMATS
    assert pipeline.stages.SUPPORTED_FORMATS is SUPPORTED_FORMATS and "GIF" not in SUPPORTED_FORMATS
    folder = write_scene(tmp_path / "s")
    Image.open(folder / "img.png").save(folder / "img.gif")
    with pytest.raises(SceneError, match="img.gif has unsupported format GIF"):
        load_scene(str(folder / "img.gif"), [str(folder / "mask0.png")])


# --- masks read by the file's mode (issue 9) -------------------------------

def _box(h=64, w=96):
    m = np.zeros((h, w), bool)
    m[20:40, 30:50] = True  # 400 of 6144 pixels: 6.5%
    return m


def _mask_file(tmp_path, kind):
    box = _box()
    path = tmp_path / f"mask_{kind}.png"
    if kind == "zero_one":
        Image.fromarray(box.astype(np.uint8)).save(path)
    elif kind == "palette":
        img = Image.fromarray(box.astype(np.uint8), "P")
        img.putpalette([0, 0, 0, 128, 0, 0])  # VOC-style colour for object 1
        img.save(path)
    elif kind == "sixteen_bit":
        Image.fromarray(box.astype(np.uint16) * 65280).save(path)  # 255 * 256
    elif kind == "float":
        Image.fromarray(box.astype(np.float32), "F").save(path := path.with_suffix(".tif"))
    elif kind == "cutout":  # a photo with the object in its alpha channel
        rgba = np.random.default_rng(0).integers(0, 256, (64, 96, 4)).astype(np.uint8)
        rgba[..., 3] = box * 255
        Image.fromarray(rgba, "RGBA").save(path)
    elif kind == "green":
        rgb = np.zeros((64, 96, 3), np.uint8)
        rgb[box] = (0, 255, 0)
        Image.fromarray(rgb).save(path)
    elif kind == "bilevel":
        Image.fromarray(box).save(path)
    return path


@pytest.mark.parametrize("kind", ["zero_one", "palette", "sixteen_bit", "float", "cutout", "green", "bilevel"])
def test_masks_are_read_by_their_mode(tmp_path, kind):
    folder = write_scene(tmp_path / "s")
    path = _mask_file(tmp_path, kind)
    scene = load_scene(str(folder / "img.png"), [str(path)])
    assert (scene.masks[0] == _box()).all()


def test_empty_is_said_only_of_an_empty_mask(tmp_path):
    folder = write_scene(tmp_path / "s")
    faint = np.zeros((64, 96), np.uint8)
    faint[20:40, 30:50] = 20
    faint[20:30, 30:50] = 40  # three levels, all dark
    Image.fromarray(faint).save(tmp_path / "faint.png")
    with pytest.raises(SceneError, match="faint.png has no pixel above half brightness") as err:
        load_scene(str(folder / "img.png"), [str(tmp_path / "faint.png")])
    assert "is empty" not in str(err.value)
    Image.fromarray(np.zeros((64, 96), np.uint8)).save(tmp_path / "black.png")
    with pytest.raises(SceneError, match="black.png is empty"):
        load_scene(str(folder / "img.png"), [str(tmp_path / "black.png")])


def test_scene_folder_extensions_in_any_case_keep_their_numbers(tmp_path):
    folder = write_scene(tmp_path / "s", boxes=((10, 10, 40, 40), (50, 20, 90, 60), (40, 45, 60, 60)))
    (folder / "mask1.png").rename(folder / "mask1.PNG")
    (folder / "img.png").rename(folder / "IMG.Png")
    scene = load_scene_dir(folder)
    assert [n.rsplit("/", 1)[1] for n in scene.mask_names] == ["mask0.png", "mask1.PNG", "mask2.png"]
    assert scene.masks[1][30, 70] and not scene.masks[1][15, 15]  # mask 1 is the second box
    Image.open(folder / "mask0.png").save(folder / "mask0.bmp")
    with pytest.raises(SceneError, match="two files for mask 0"):
        load_scene_dir(folder)


def test_a_file_given_as_scene_folder_is_not_a_folder(tmp_path):
    folder = write_scene(tmp_path / "s")
    with pytest.raises(SceneError, match="img.png is not a folder"):
        load_scene_dir(folder / "img.png")
