import fsspec
import pytest
import torch

from breakscene.errors import ModelLoadError
from breakscene.models.loading import load_models


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny-sd"
    load_models("tiny").save_pretrained(folder)
    return folder


def _same_weights(a, b):
    for module in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, module).state_dict(), getattr(b, module).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), module


def test_presets_are_deterministic():
    _same_weights(load_models("tiny"), load_models("tiny"))


def test_diffusers_folder_loads_like_the_preset(saved_tiny):
    base = load_models("tiny")
    for spec in (str(saved_tiny), f"file://{saved_tiny}"):
        loaded = load_models(spec)
        _same_weights(base, loaded)
        assert loaded.native_resolution == 64 and loaded.model_id == spec
        assert loaded.tokenizer("a photo of a bear").input_ids == base.tokenizer("a photo of a bear").input_ids
        assert loaded.scheduler.config.beta_schedule == "scaled_linear"


def test_fsspec_uri_is_fetched_once_into_the_cache(saved_tiny, isolated_cache):
    fs = fsspec.filesystem("memory")
    for path in saved_tiny.rglob("*"):
        if path.is_file():
            fs.pipe(f"/models/tiny-sd/{path.relative_to(saved_tiny).as_posix()}", path.read_bytes())
    loaded = load_models("memory://models/tiny-sd")
    _same_weights(load_models("tiny"), loaded)
    cached = list((isolated_cache / "models").iterdir())
    fs.rm("/models/tiny-sd", recursive=True)  # the second load must not need the store
    load_models("memory://models/tiny-sd")
    assert list((isolated_cache / "models").iterdir()) == cached


def test_unknown_model_errors_name_the_value(tmp_path):
    with pytest.raises(ModelLoadError, match="'nobody/no-such-model' is not a preset"):
        load_models("nobody/no-such-model")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_models(str(tmp_path / "missing" / "model"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="missing vae, text_encoder, tokenizer, scheduler"):
        load_models(str(tmp_path / "half"))
