"""`breakscene submit` before anything is sent (issue 11): the working_dir is the job's
project wherever the command runs, excludes are honoured, an oversized upload is refused
in one line, the token and address are found as Ray's CLI finds them. The real Jobs API
run is in test_pipeline_cluster.py."""
import pytest
import yaml

from breakscene.errors import BreakSceneError
from commands.jobs import load_job
from batchjob.submit import (DEFAULT_ADDRESS, MIB, SECRET_EXCLUDES, check_upload, exit_status, find_auth_token,
                             job_runtime_env, project_root, resolve_address, upload_files)


def _project(root, runtime_env=None):
    """A project: pyproject.toml, code, a job file in jobs/, and what must never travel."""
    (root / "pkg").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'p'\n")
    (root / "pkg" / "code.py").write_text("x = 1\n")
    for junk in (".venv/lib/big.so", "out/run/table.parquet", ".git/objects/pack", "pkg/__pycache__/code.pyc",
                 "data/raw.bin", "notes/ignored.log"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_bytes(b"\0" * 1000)
    (root / ".gitignore").write_text("*.log\n")
    job = {"output": "out/x", "manifest": "m.jsonl",
           "runtime_env": runtime_env if runtime_env is not None else
           {"working_dir": ".", "excludes": ["**/__pycache__/", "data/"]}}
    (root / "jobs").mkdir()
    (root / "jobs" / "job.yaml").write_text(yaml.safe_dump(job))
    return root / "jobs" / "job.yaml"


def test_working_dir_is_the_job_files_project_not_the_current_folder(tmp_path, monkeypatch):
    job_file = _project(tmp_path / "project")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "stray.bin").write_bytes(b"\0" * 5000)
    monkeypatch.chdir(elsewhere)
    env = job_runtime_env(load_job(job_file), str(job_file))
    assert env["working_dir"] == str((tmp_path / "project").resolve())
    assert env["excludes"] == [*SECRET_EXCLUDES, "**/__pycache__/", "data/", ".venv/", "out/", ".git/"]
    files = dict(upload_files(env["working_dir"], env["excludes"]))
    # the project's code and job travel; the venv, outputs, git, caches, data and .gitignored files do not
    assert sorted(files) == [".gitignore", "jobs/job.yaml", "pkg/code.py", "pyproject.toml"]
    assert check_upload(env, 1 * MIB) == (4, sum(files.values()))


def test_project_root_without_pyproject_is_the_job_files_folder(tmp_path):
    (tmp_path / "a" / "jobs").mkdir(parents=True)
    assert project_root(tmp_path / "a" / "jobs" / "j.yaml") == (tmp_path / "a" / "jobs").resolve()
    (tmp_path / "a" / "pyproject.toml").write_text("")
    assert project_root(tmp_path / "a" / "jobs" / "j.yaml") == (tmp_path / "a").resolve()


def test_absent_working_dir_is_the_project_and_runtime_env_file_replaces_the_jobs(tmp_path, monkeypatch):
    job_file = _project(tmp_path / "project", runtime_env={})
    monkeypatch.chdir(tmp_path)
    env = job_runtime_env(load_job(job_file), str(job_file))
    assert env == {"working_dir": str((tmp_path / "project").resolve()),
                   "excludes": [*SECRET_EXCLUDES, ".venv/", "out/", ".git/"]}
    # --runtime-env FILE: its relative working_dir against its own project
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    (other / "pyproject.toml").write_text("")
    (other / "envs").mkdir()
    (other / "envs" / "env.yaml").write_text("working_dir: sub\nenv_vars: {A: '1'}\n")
    env = job_runtime_env(load_job(job_file), str(job_file), str(other / "envs" / "env.yaml"))
    assert env["working_dir"] == str((other / "sub").resolve()) and env["env_vars"] == {"A": "1"}
    # without a working_dir it keeps the job's project
    (other / "envs" / "vars.yaml").write_text("env_vars: {A: '1'}\n")
    env = job_runtime_env(load_job(job_file), str(job_file), str(other / "envs" / "vars.yaml"))
    assert env["working_dir"] == str((tmp_path / "project").resolve())


def test_an_upload_over_the_limit_is_refused_in_one_line_naming_the_largest(tmp_path):
    job_file = _project(tmp_path / "project", runtime_env={"working_dir": "."})
    (tmp_path / "project" / "checkpoints").mkdir()
    (tmp_path / "project" / "checkpoints" / "sam.pth").write_bytes(b"\0" * (3 * MIB))
    env = job_runtime_env(load_job(job_file), str(job_file))
    with pytest.raises(BreakSceneError) as err:
        check_upload(env, 2 * MIB)
    message = str(err.value)
    assert "\n" not in message and "would upload 3.0 MiB in 7 files, over the 2 MiB limit" in message
    assert "largest: checkpoints/ 3.0 MiB" in message and "runtime_env.excludes" in message


def test_submit_refuses_before_contacting_any_cluster(tmp_path, monkeypatch, capsys):
    """Through the command line: exit 2 with one error line, no traceback; the address
    points nowhere, so reaching it would have failed differently."""
    from commands.main import main

    job_file = _project(tmp_path / "project", runtime_env={"working_dir": "."})
    (tmp_path / "project" / "big.bin").write_bytes(b"\0" * (2 * MIB))
    monkeypatch.chdir(tmp_path)
    code = main(["submit", str(job_file), "--address", "http://127.0.0.1:9", "--max-upload-mib", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: runtime_env.working_dir") and err.count("\n") == 1
    assert "Traceback" not in err
    (tmp_path / "project" / "jobs" / "bad.yaml").write_text(
        yaml.safe_dump({"output": "o", "manifest": "m", "runtime_env": {"working_dir": "../nowhere"}}))
    assert main(["submit", str(tmp_path / "project" / "jobs" / "bad.yaml")]) == 2
    assert "runtime_env.working_dir '../nowhere' is not a folder" in capsys.readouterr().err


def test_token_lookup_follows_rays_order(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("home-token\nsecond line\n")
    (tmp_path / "tok").write_text("  path-token  \n")
    env = {"HOME": str(home)}
    assert find_auth_token(env) == ("home-token", str(home / ".ray" / "auth_token"))
    assert find_auth_token({**env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}) == ("path-token", str(tmp_path / "tok"))
    assert find_auth_token({**env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok"), "RAY_AUTH_TOKEN": " env-token "}) == \
        ("env-token", "RAY_AUTH_TOKEN")
    assert find_auth_token({**env, "RAY_AUTH_TOKEN": ""})[0] == "home-token"  # empty counts as unset, as in Ray
    with pytest.raises(BreakSceneError, match="RAY_AUTH_TOKEN_PATH is set but .*missing cannot be read or is empty"):
        find_auth_token({**env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    assert find_auth_token({"HOME": str(tmp_path / "nobody")}) == (None, "")
    # the default lookup reads the process environment, as Ray's loader does
    monkeypatch.setenv("HOME", str(home))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert find_auth_token()[0] == "home-token"


def test_address_from_flag_then_api_server_then_ray_address():
    env = {"RAY_ADDRESS": "http://ray:8265", "RAY_API_SERVER_ADDRESS": "http://api:8265"}
    assert resolve_address("http://flag:8265", env) == "http://flag:8265"
    assert resolve_address(None, env) == "http://api:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "http://ray:8265"}) == "http://ray:8265"
    assert resolve_address(None, {}) == DEFAULT_ADDRESS


def test_exit_status_carries_the_entrypoints_own_codes():
    assert exit_status("SUCCEEDED", "") == 0
    assert exit_status("FAILED", "Job entrypoint command failed with exit code 3, last available logs ...") == 3
    assert exit_status("FAILED", "anything", driver_exit_code=2) == 2
    assert exit_status("FAILED", "Job entrypoint command failed with exit code 4, ...") == 4  # output not writable
    assert exit_status("FAILED", "Job entrypoint command failed with exit code 1.") == 1
    assert exit_status("STOPPED", "Job was intentionally stopped.") == 1
