"""Issue 17 end to end: `breakscene run` against an S3 server on 127.0.0.1 (moto, its own
process) configured only the standard way, through the AWS environment variables; and
through a named AWS profile. The files s3fs writes and the Delta tables delta-rs commits
land under the same prefix, and the run exits 0."""
import json
import os

import pytest

from pipeline_helpers import free_port, moto_server_process, run_cli, write_job

pytestmark = pytest.mark.e2e
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture(scope="module")
def s3_server():
    with moto_server_process(free_port()) as endpoint:
        yield endpoint


def _manifest(tmp_path, examples):
    rows = [{"image_uri": str(examples / n / "img.jpg"), "image_id": n,
             "mask_uris": [str(examples / n / f"mask{i}.png") for i in range(3)]} for n in ("bear", "chicken")]
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _isolated(tmp_path, monkeypatch) -> dict:
    """No AWS setting of the machine's: the test names each one."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    return {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_EC2_METADATA_DISABLED": "true"}


def _bucket_client(endpoint: str, bucket: str):
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint},
                           skip_instance_cache=True)
    fs.mkdir(bucket)
    return fs


@pytest.mark.parametrize("how", ["environment", "profile"])
def test_run_with_s3_from_the_aws_environment_commits_its_tables(tmp_path, monkeypatch, examples, s3_server, how):
    bucket = f"issue17-{how}"
    fs = _bucket_client(s3_server, bucket)
    env = _isolated(tmp_path, monkeypatch)
    if how == "environment":
        env.update(AWS_ENDPOINT_URL=s3_server, **KEYS)
    else:
        (tmp_path / "config").write_text(f"[profile lab]\nregion = eu-west-3\nendpoint_url = {s3_server}\n")
        (tmp_path / "credentials").write_text("[lab]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
        env.update(AWS_CONFIG_FILE=str(tmp_path / "config"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "credentials"),
                   AWS_PROFILE="lab")
    job = write_job(tmp_path / "job.yaml", "unused.jsonl", "unused")
    proc = run_cli("run", str(job), "--manifest", str(_manifest(tmp_path, examples)),
                   "--output", f"s3://{bucket}/run", "--stop-after", "score", **env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    listed = fs.find(f"{bucket}/run")
    assert f"{bucket}/run/summary.json" in listed and f"{bucket}/run/.breakscene-output" in listed
    assert any(p.startswith(f"{bucket}/run/images/_delta_log/") for p in listed)
    assert any(p.startswith(f"{bucket}/run/masks/_delta_log/") for p in listed)
    assert not any(".breakscene-probe" in p for p in listed)
    summary = json.loads(fs.cat(f"{bucket}/run/summary.json"))
    assert summary["tables"]["images"] == 2 and summary["counts"]["failed"] == 0
