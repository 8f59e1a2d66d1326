"""Storage: what the project did not write is never deleted, and every remote read is
bounded in time and says what happened (servers started here on 127.0.0.1)."""
import time

import fsspec
import pytest

from breakscene.files import storage
from breakscene.errors import BreakSceneError, OutputError, StorageError
from net_helpers import refused_url, silent_server, status_server


@pytest.fixture
def fast_io(monkeypatch):
    monkeypatch.setenv("BREAKSCENE_IO_TIMEOUT_S", "0.5")
    monkeypatch.setenv("BREAKSCENE_IO_RETRIES", "1")
    monkeypatch.setattr(storage, "BACKOFF_S", 0.05)
    # an earlier test in this process may have configured the job's settings: these win
    storage.configure(None, timeout_s=0.5, retries=1)
    yield
    storage.reset_io_settings()


# --- timeouts, retries, messages ------------------------------------------

def test_a_silent_server_times_out_with_the_uri_and_the_timeout(fast_io):
    with silent_server() as url:
        start = time.perf_counter()
        with pytest.raises(StorageError) as err:
            storage.read_bytes(f"{url}/img.png")
        seconds = time.perf_counter() - start
    msg = str(err.value)
    assert f"{url}/img.png" in msg and "timed out" in msg and "0.5 s" in msg and "2 attempts" in msg
    assert seconds < 5  # two attempts of 0.5 s each, and a short backoff


def test_http_500_is_retried_and_reported_as_such(fast_io):
    with status_server(500) as (url, hits):
        with pytest.raises(StorageError, match="HTTP 500") as err:
            storage.read_bytes(f"{url}/img.png")
    assert "does not exist" not in str(err.value)
    assert len(hits) == 2  # the first attempt and one retry


def test_http_404_is_missing_and_not_retried(fast_io):
    with status_server(404) as (url, hits):
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(f"{url}/img.png")
    assert len(hits) == 1


def test_refused_connection_is_reported_as_such(fast_io):
    with pytest.raises(StorageError, match="cannot connect") as err:
        storage.read_bytes(f"{refused_url()}/img.png")
    assert "does not exist" not in str(err.value)


def test_configure_sets_timeout_and_retries(monkeypatch):
    storage.reset_io_settings()  # no earlier configure() in this process
    monkeypatch.delenv("BREAKSCENE_IO_TIMEOUT_S", raising=False)
    monkeypatch.delenv("BREAKSCENE_IO_RETRIES", raising=False)
    assert storage.io_settings() == (storage.DEFAULT_TIMEOUT_S, storage.DEFAULT_RETRIES)
    monkeypatch.setenv("BREAKSCENE_IO_TIMEOUT_S", "7")
    assert storage.io_settings() == (7.0, storage.DEFAULT_RETRIES)
    storage.configure({}, timeout_s=3, retries=0)  # a job file's settings win over the environment
    assert storage.io_settings() == (3.0, 0)
    fs, _ = storage.filesystem("http://127.0.0.1:1/x")
    timeout = fs.kwargs.get("timeout") or fs.client_kwargs["timeout"]
    assert (timeout.sock_connect, timeout.sock_read) == (3.0, 3.0)
    s3 = storage.protocol_options("s3", 3.0, 0)["config_kwargs"]
    assert (s3["connect_timeout"], s3["read_timeout"], s3["retries"]["max_attempts"]) == (3.0, 3.0, 1)


def test_pipeline_storage_settings_are_validated():
    from batchjob.settings import StorageConfig

    cfg = StorageConfig.model_validate({"timeout_s": 5, "retries": 1})
    assert (cfg.timeout_s, cfg.retries) == (5.0, 1)
    with pytest.raises(ValueError, match="timeout_s"):
        StorageConfig.model_validate({"timeout_s": 0})


# --- never delete what the project did not write --------------------------

def _bundle_dir(tmp_path, name="local"):
    folder = tmp_path / name
    (folder / "masks").mkdir(parents=True)
    (folder / "masks" / "mask0.png").write_bytes(b"m")
    (folder / "bundle.json").write_text("{}")
    return folder


def test_atomic_local_dir_never_replaces_a_users_folder(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="did not write"):
        with storage.atomic_local_dir(user, marker="bundle.json") as tmp:
            (tmp / "bundle.json").write_text("{}")
    assert (user / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left


def test_publish_dir_replaces_only_its_own_bundles_locally(tmp_path):
    src = _bundle_dir(tmp_path, "src")
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError):
        storage.publish_dir(src, str(user), "bundle.json")
    assert (user / "notes.txt").read_text() == "keep me" and not (user / "bundle.json").exists()
    old = _bundle_dir(tmp_path, "old")
    (old / "stale.txt").write_text("from an older bundle")
    storage.publish_dir(src, str(old), "bundle.json")  # a bundle of ours: replaced whole
    assert sorted(p.name for p in old.rglob("*")) == ["bundle.json", "mask0.png", "masks"]
    empty = tmp_path / "empty"
    empty.mkdir()
    storage.publish_dir(src, str(empty), "bundle.json")
    assert (empty / "bundle.json").is_file()


def test_publish_dir_on_an_object_store_removes_only_its_own(tmp_path):
    fs = fsspec.filesystem("memory")
    src = _bundle_dir(tmp_path)
    # someone else's objects under the prefix: refused, untouched
    fs.pipe_file("/store/user/notes.txt", b"keep me")
    with pytest.raises(OutputError, match="did not write"):
        storage.publish_dir(src, "memory://store/user", "bundle.json")
    assert fs.cat_file("/store/user/notes.txt") == b"keep me" and not fs.exists("/store/user/bundle.json")
    # a cut-short upload of ours (PARTIAL present) and an old bundle: both replaced
    fs.pipe_file(f"/store/partial/{storage.PARTIAL}", b"")
    fs.pipe_file("/store/partial/masks/old.png", b"x")
    fs.pipe_file("/store/old/bundle.json", b"{}")
    fs.pipe_file("/store/old/stale.txt", b"x")
    for prefix in ("partial", "old", "new"):
        storage.publish_dir(src, f"memory://store/{prefix}", "bundle.json")
        assert sorted(p.rsplit(f"/{prefix}/", 1)[1] for p in fs.find(f"/store/{prefix}")) == \
            ["bundle.json", "masks/mask0.png"]


def test_an_interrupted_upload_is_recognisably_ours(tmp_path, monkeypatch):
    fs = fsspec.filesystem("memory")
    src = _bundle_dir(tmp_path)
    real_put = type(fs).put_file

    def failing_put(self, lpath, rpath, **kw):
        if rpath.endswith("bundle.json"):
            raise ConnectionError("network gone")
        return real_put(self, lpath, rpath, **kw)

    monkeypatch.setattr(type(fs), "put_file", failing_put)
    monkeypatch.setattr(type(fs), "rm", lambda *a, **k: None)  # as if killed: no clean-up ran
    with pytest.raises(StorageError, match="network gone"):
        storage.publish_dir(src, "memory://store/cut", "bundle.json")
    assert not fs.exists("/store/cut/bundle.json")  # never read as a result
    assert fs.exists(f"/store/cut/{storage.PARTIAL}") and fs.exists("/store/cut/masks/mask0.png")
    monkeypatch.undo()
    storage.publish_dir(src, "memory://store/cut", "bundle.json")  # the retry replaces what is left
    assert not fs.exists(f"/store/cut/{storage.PARTIAL}") and fs.exists("/store/cut/bundle.json")


def test_bad_io_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("BREAKSCENE_IO_TIMEOUT_S", "soon")
    with pytest.raises(BreakSceneError, match="BREAKSCENE_IO_TIMEOUT_S='soon'"):
        storage.read_bytes("http://127.0.0.1:1/x")
