"""Phase 2's modes said once (``breakscene.method.phases``): what trains, what is
kept, what is undone; and a TrainedScene used after a reset raises."""
import ast

import pytest
import torch
from conftest import ROOT, quick_config

from breakscene import load_scene_dir
from breakscene.errors import StaleSceneError
from breakscene.method.phases import PHASE2_MODES, phase2_mode
from breakscene.models.presets import build_preset


def _branches_on_mode(tree: ast.AST) -> list[int]:
    """Lines that compare something's ``phase2_mode`` (an ``if`` on the mode string)."""
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Compare)
            and any(isinstance(x, ast.Attribute) and x.attr == "phase2_mode" for x in ast.walk(node))]


def test_the_mode_string_is_branched_on_nowhere():
    found = {}
    for path in sorted((ROOT / "breakscene").rglob("*.py")):
        lines = _branches_on_mode(ast.parse(path.read_text()))
        if lines:
            found[str(path.relative_to(ROOT))] = lines
    assert found == {}, f"branch on phase2_mode outside phase2_modes.PHASE2_MODES: {found}"
    assert _branches_on_mode(ast.parse("if cfg.phase2_mode == 'full':\n    pass\n")) == [1]  # the check finds one


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("mode", sorted(PHASE2_MODES))
def test_each_mode_trains_its_parameters_and_undoes_them(mode):
    unet, _, te, _, _ = build_preset("tiny")
    cfg = quick_config(phase2_mode=mode)
    unet0, te0 = _state(unet), _state(te)
    impl = phase2_mode(cfg)
    kept = impl.snapshot(unet, te, None)
    setup = impl.setup(cfg, unet, te, keep_rows=lambda: None)
    names = {id(p) for p in setup.trainable}
    if mode == "full":
        assert len(names) == len(list(unet.parameters())) + len(list(te.parameters())) and not setup.adapters
    else:
        assert setup.adapters and all("lora" in n for n, p in unet.named_parameters() if id(p) in names)
        assert [g["lr"] for g in setup.groups] == [cfg.lora.lr, cfg.phase2_lr]
    with torch.no_grad():  # a training step's worth of change to everything that trains
        for p in setup.trainable:
            p.add_(0.5)
    impl.undo(unet, te, kept)
    assert _state(unet).keys() == unet0.keys() and all(torch.equal(_state(unet)[k], v) for k, v in unet0.items())
    emb = te.get_input_embeddings().weight
    if mode == "full":  # the whole text encoder comes back; under lora the rows are the caller's
        assert all(torch.equal(_state(te)[k], v) for k, v in te0.items())
    else:
        assert not any("lora" in n for n, _ in te.named_parameters()) and _state(te).keys() == te0.keys()
        assert any(p is emb for p in setup.trainable)  # the embedding rows train too (their hygiene: the caller)


def test_a_trained_scene_used_after_reset_raises(tiny_extractor, examples):
    ex = tiny_extractor
    trained = ex.train(ex.prepare(load_scene_dir(examples / "bear"), quick_config(
        phase1_steps=1, phase2_steps=1, grid_seeds=0, phase2_mode="lora", prior={"enabled": False})))
    assert trained.models is ex.models  # current: the resident models, trained
    ex.reset()
    with pytest.raises(StaleSceneError, match="was reset"):
        trained.models
    with pytest.raises(StaleSceneError):
        ex.diagnose(trained)
