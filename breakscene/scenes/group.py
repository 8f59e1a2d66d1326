"""A concept group: several photographs of the same objects, each mask labelled with the
object it shows. The same label in several images is one object, learned as one token;
a label seen once is an object seen once. A group of one image is a scene, exactly.

Labels are also the tokens' initializer words (as ``--init-token`` words are for one
scene). A scene folder may hold them in ``labels.txt``: one label per line, line i for
``mask{i}``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from breakscene.config import MAX_GROUP_IMAGES
from breakscene.errors import SceneError
from breakscene.scenes.scene import Scene, load_scene, scene_dir_files

LABELS_FILE = "labels.txt"


@dataclass
class SceneGroup:
    scenes: list[Scene]
    labels: list[list[str]]  # per scene, one label per mask (empty lists: a single unlabelled scene)
    draw: str = "uniform"  # how a step picks its image ("uniform", "balanced": extraction/groups.py)

    @property
    def tokens(self) -> list[str]:
        """The group's objects (one token each), in the order they are first seen."""
        return list(dict.fromkeys(label for labels in self.labels for label in labels))

    @property
    def num_concepts(self) -> int:
        return len(self.tokens) if self.is_labelled else self.scenes[0].num_concepts

    @property
    def is_labelled(self) -> bool:
        return any(self.labels)

    def token_of(self) -> list[tuple[int, ...]]:
        """Per scene: the token index of each of its masks (identity for an unlabelled scene)."""
        if not self.is_labelled:
            return [tuple(range(s.num_concepts)) for s in self.scenes]
        index = {label: i for i, label in enumerate(self.tokens)}
        return [tuple(index[label] for label in labels) for labels in self.labels]

    def sources(self, token: int) -> list[tuple[int, int]]:
        """(scene, mask) pairs the token is learned from."""
        return [(s, m) for s, tokens in enumerate(self.token_of()) for m, t in enumerate(tokens) if t == token]


def check_labels(labels: list[str], masks: int, where: str) -> list[str]:
    labels = [label.strip() for label in labels]
    if len(labels) != masks:
        raise SceneError(f"{where}: {len(labels)} labels for {masks} masks (one label per mask, in mask order)")
    empty = [i for i, label in enumerate(labels) if not label]
    if empty:
        raise SceneError(f"{where}: the label of mask {empty[0]} is empty")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise SceneError(f"{where}: label {repeated[0]!r} names two masks of one image; a label is one object")
    return labels


def read_labels(folder: str | Path) -> list[str] | None:
    """The labels of a scene folder's masks (``labels.txt``), or None when it has none."""
    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SceneError(f"{path} cannot be read: {exc}") from None
    return [line for line in text.splitlines() if line.strip()]


def build_group(scenes: list[Scene], labels: list[list[str] | None], max_concepts: int,
                names: list[str] | None = None) -> SceneGroup:
    """A group from scenes and their labels (None: none given). One scene may be unlabelled;
    several must all be labelled (the labels are what ties their masks together)."""
    names = names or [s.image_name for s in scenes]
    if not scenes:
        raise SceneError("a concept group needs at least one image")
    if len(scenes) > MAX_GROUP_IMAGES:
        raise SceneError(f"a concept group of {len(scenes)} images is more than {MAX_GROUP_IMAGES}")
    if len(scenes) > 1 and any(found is None for found in labels):
        missing = next(n for n, found in zip(names, labels) if found is None)
        raise SceneError(f"{missing} has no labels: every image of a group needs one label per mask "
                         f"({LABELS_FILE} in a scene folder), so that its masks can be matched to the others'")
    checked = [[] if found is None else check_labels(found, s.num_concepts, n)
               for s, found, n in zip(scenes, labels, names)]
    group = SceneGroup(scenes, checked)
    if group.num_concepts > max_concepts:
        raise SceneError(f"the group has {group.num_concepts} objects ({', '.join(group.tokens)}), "
                         f"more than max_concepts={max_concepts}")
    return group


def load_group_dirs(folders: list[str | Path], max_concepts: int = 4) -> SceneGroup:
    """Scene folders (``img.*``, ``mask{i}.*``, ``labels.txt``) as one group."""
    scenes, labels = [], []
    for folder in folders:
        image, masks = scene_dir_files(folder)
        found = read_labels(folder)
        # a labelled image may show fewer objects than the group: its own masks are bounded
        # by the group's limit, checked once the labels are matched
        scenes.append(load_scene(image, masks, max_concepts if found is None else max(max_concepts, len(masks))))
        labels.append(found)
    return build_group(scenes, labels, max_concepts, [str(f) for f in folders])
