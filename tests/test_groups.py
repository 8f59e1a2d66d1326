"""Concept groups (issue 20): several photographs of the same objects, one token per label."""
import pytest
from conftest import write_scene

from breakscene.errors import SceneError
from breakscene.scenes.group import LABELS_FILE, load_group_dirs


def _labelled(folder, labels, boxes=((10, 10, 40, 40), (50, 20, 90, 60))):
    write_scene(folder, boxes=boxes[: len(labels)])
    (folder / LABELS_FILE).write_text("\n".join(labels) + "\n")
    return folder


def test_the_same_label_in_several_images_is_one_token(tmp_path):
    a = _labelled(tmp_path / "a", ["dog", "ball"])
    b = _labelled(tmp_path / "b", ["cat", "dog"])
    c = _labelled(tmp_path / "c", ["dog"])
    group = load_group_dirs([a, b, c])
    assert group.tokens == ["dog", "ball", "cat"] and group.num_concepts == 3
    assert group.token_of() == [(0, 1), (2, 0), (0,)]
    assert group.sources(0) == [(0, 0), (1, 1), (2, 0)] and group.sources(2) == [(1, 0)]


def test_a_single_unlabelled_scene_is_todays_scene(tmp_path):
    write_scene(tmp_path / "s")
    group = load_group_dirs([tmp_path / "s"])
    assert not group.is_labelled and group.num_concepts == 2 and group.token_of() == [(0, 1)]


@pytest.mark.parametrize("case, message", [
    ("unlabelled_member", "has no labels: every image of a group needs one label per mask"),
    ("count", "1 labels for 2 masks"),
    ("repeated", "label 'dog' names two masks of one image"),
    ("too_many", "the group has 5 objects (a, b, c, d, e), more than max_concepts=4"),
])
def test_bad_groups_are_one_error_naming_the_problem(tmp_path, case, message):
    a = _labelled(tmp_path / "a", ["a", "b"])
    if case == "unlabelled_member":
        write_scene(tmp_path / "b")
    elif case == "count":
        write_scene(tmp_path / "b")
        (tmp_path / "b" / LABELS_FILE).write_text("x\n")
    elif case == "repeated":
        _labelled(tmp_path / "b", ["dog", "dog"])
    else:
        _labelled(tmp_path / "b", ["c", "d"])
        _labelled(tmp_path / "c", ["e"])
    folders = [a, tmp_path / "b"] + ([tmp_path / "c"] if case == "too_many" else [])
    with pytest.raises(SceneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_group_dirs(folders)


# --- the method over a group ---------------------------------------------------------

import json  # noqa: E402
import random  # noqa: E402

import torch  # noqa: E402
from conftest import quick_config  # noqa: E402

from breakscene.extraction import groups  # noqa: E402
from breakscene.extraction.extractor import prepare_group  # noqa: E402
from breakscene.extraction.tensors import subset_masks  # noqa: E402
from breakscene.scenes.group import SceneGroup  # noqa: E402
from breakscene.scenes.scene import load_scene_dir  # noqa: E402


def test_a_group_of_one_through_the_group_path_is_the_golden_curve(examples):
    """The group path (``prepare_group``, ``draw_group_batch``) on one image draws what one
    scene draws: the golden curves of tests/test_golden_curves.py, to their tolerance."""
    import test_golden_curves as golden
    from breakscene.extraction.extractor import Extractor

    before = torch.get_num_threads()
    torch.set_num_threads(golden.THREADS)
    try:
        ex = Extractor("tiny", progress=False)
        class_dir = _class_dir()
        group = SceneGroup([load_scene_dir(examples / "bear")], [[]])
        cfg = golden.golden_config(class_dir, phase2_mode="lora")
        try:
            prepared = prepare_group(ex, group, cfg)
            assert prepared.group is not None and len(prepared.group.tensors.images) == 1
            trained = ex.train(prepared)
            losses = {p: r.summary() for p, r in trained.phases.items()}
        finally:
            ex.reset()
    finally:
        torch.set_num_threads(before)
    golden.assert_phase(losses["phase1"], golden.PHASE1)
    golden.assert_phase(losses["phase2"], golden.PHASE2["lora"])


def _class_dir():
    """The golden tests' class images, made the same way (seeded noise, 64 px)."""
    import tempfile

    import numpy as np
    from PIL import Image

    folder = tempfile.mkdtemp(prefix="class-")
    rs = np.random.RandomState(7)
    for i in range(3):
        Image.fromarray(rs.randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(f"{folder}/{i}.png")
    return folder


def _two_image_group(tmp_path, draw="uniform"):
    a = _labelled(tmp_path / "a", ["dog", "ball"])
    b = _labelled(tmp_path / "b", ["cat", "dog"], boxes=((5, 5, 30, 50), (40, 10, 80, 50)))
    group = load_group_dirs([a, b])
    group.draw = draw
    return group


@pytest.mark.parametrize("draw", ["uniform", "balanced"])
def test_each_step_uses_one_images_masks_with_that_images_tokens(tiny_extractor, tmp_path, monkeypatch, draw):
    group = _two_image_group(tmp_path, draw)
    cfg = quick_config(prior={"enabled": False}, batch_size=1)
    prepared = prepare_group(tiny_extractor, group, cfg)
    try:
        data = prepared.group.tensors
        assert data.token_of == [(0, 1), (2, 0)] and prepared.init_words == ["dog", "ball", "cat"]
        picked = []
        real_pick = groups.pick_image
        monkeypatch.setattr(groups, "pick_image", lambda rng, g: picked.append(real_pick(rng, g)) or picked[-1])
        named = []

        def encode(tokens):
            named.append(tokens)
            return tiny_extractor.assets.encode_subset(tokens)

        rng, gen = random.Random(0), torch.Generator().manual_seed(0)
        for _ in range(60):
            batch = groups.draw_group_batch(data, None, cfg, rng=rng, gen=gen, encode_subset=encode,
                                            num_train_timesteps=1000)
            j, tokens = picked[-1], named[-1]
            subset = tuple(data.token_of[j].index(t) for t in tokens)  # its tokens are the image's own
            wanted = [subset_masks(data.images[j], flip, subset)[1] for flip in (0, 1)]
            assert any(torch.equal(batch.union_mask[0], w) for w in wanted)  # that image's masks only
        assert set(picked) == {0, 1}
        dog = sum(0 in t for t in named)
        assert dog > sum(2 in t for t in named)  # "dog" is in both images: more of its steps
    finally:
        tiny_extractor.reset()


def test_balanced_draw_picks_objects_evenly():
    data = groups.GroupTensors(images=[None] * 3, token_of=[(0,), (0,), (0, 1)], draw="balanced")
    rng = random.Random(1)
    picks = [groups.pick_image(rng, data) for _ in range(3000)]
    # object 1 is only in image 2: half the steps pick it there, the other half spread over 3 images
    assert picks.count(2) / 3000 == pytest.approx(0.5 + 0.5 / 3, abs=0.03)
    data.draw = "uniform"
    picks = [groups.pick_image(rng, data) for _ in range(3000)]
    assert picks.count(2) / 3000 == pytest.approx(1 / 3, abs=0.03)


def test_extract_a_group_writes_one_bundle_that_names_every_source(tmp_path, capsys):
    from commands.main import main

    group_dirs = _two_image_group(tmp_path)  # writes the folders
    assert group_dirs.tokens == ["dog", "ball", "cat"]
    out = tmp_path / "bundle"
    code = main(["extract", "--model", "tiny", "--scene", str(tmp_path / "a"), "--scene", str(tmp_path / "b"),
                 "--smoke", "--resolution", "64", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    info = json.loads((out / "bundle.json").read_text())
    assert info["tokens"] == ["<asset0>", "<asset1>", "<asset2>"]
    assert [c["label"] for c in info["concepts"]] == ["dog", "ball", "cat"]
    assert [c["sources"] for c in info["concepts"]] == [[[0, 0], [1, 1]], [[0, 1]], [[1, 0]]]
    images = info["group"]["images"]
    assert [im["labels"] for im in images] == [["dog", "ball"], ["cat", "dog"]]
    assert [im["name"].endswith(("a/img.png", "b/img.png")) for im in images] == [True, True]
    assert [len(im["diagnostic"]) for im in images] == [2, 2]
    assert all((out / im["image"]).is_file() and all((out / m).is_file() for m in im["masks"]) for im in images)
    card = (out / "README.md").read_text()
    assert "concept group of\n2 images" in card and "| dog, ball |" in card and "| cat, dog |" in card
    from breakscene.files.bundle import load_bundle_pipeline

    pipe, _ = load_bundle_pipeline(str(out))
    assert all(t in pipe.tokenizer.get_vocab() for t in info["tokens"])


def test_a_group_bundle_loads_in_plain_diffusers_and_gives_its_grid(tmp_path, capsys):
    """The group's bundle is a bundle like any other: its model card's snippet, run in a
    process that cannot import the project, draws the grid's cells bit for bit."""
    import numpy as np
    from PIL import Image

    from breakscene.extraction.generate import grid_cell
    from commands.main import main
    from test_bundle_diffusers import FAST, _pixels, _run_card_snippet

    _two_image_group(tmp_path)
    out = tmp_path / "bundle"
    (tmp_path / "fast.yaml").write_text("grid_inference_steps: 3\nprior: {generation_steps: 2}\n")
    assert main(["extract", "--model", "tiny", "--scene", str(tmp_path / "a"), "--scene", str(tmp_path / "b"),
                 "--phase2-mode", "lora", "--resolution", "64", "--config", str(tmp_path / "fast.yaml"), *FAST,
                 "--out", str(out)]) == 0, capsys.readouterr().err
    assert main(["export-base", "tiny", str(tmp_path / "tiny-diffusers")]) == 0
    _, work = _run_card_snippet(out, tmp_path)
    info = json.loads((out / "bundle.json").read_text())
    seeds = info["sampler"]["seeds"]
    columns = len(set(seeds))
    assert len(seeds) == columns * 4  # a row per token (dog, ball, cat) and one with all of them
    grid = Image.open(out / "grid.png")
    for i in range(len(seeds)):
        row, col = divmod(i, columns)
        assert np.array_equal(_pixels(Image.open(work / f"grid_{i}.png")), _pixels(grid_cell(grid, row, col, 64))), i
