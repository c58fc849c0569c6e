"""DVC really versions data: `dvc add` + `dvc push` to a local-directory remote and to an S3 remote (dvc-s3 against
a moto S3 server on loopback), then `dvc pull` restores the exact bytes into a clean workspace."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

pytestmark = pytest.mark.slow
DVC = [sys.executable, "-m", "dvc"]


def sh(cmd, cwd, env=None):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def make_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "data" / "raw" / "sub").mkdir(parents=True)
    (repo / "data" / "raw" / "a.txt").write_text("alpha\n")
    (repo / "data" / "raw" / "sub" / "b.bin").write_bytes(os.urandom(4096))
    sh(["git", "init", "-q"], repo)
    sh(["git", "config", "user.email", "t@example.com"], repo)
    sh(["git", "config", "user.name", "t"], repo)
    sh(DVC + ["init", "-q"], repo)
    sh(DVC + ["config", "core.analytics", "false"], repo)
    sh(DVC + ["add", "-q", "data/raw"], repo)
    return repo


def roundtrip(repo: Path, env=None) -> None:
    before = digest_tree(repo / "data" / "raw")
    sh(DVC + ["push", "-q"], repo, env)
    shutil.rmtree(repo / "data" / "raw")
    shutil.rmtree(repo / ".dvc" / "cache")
    sh(DVC + ["pull", "-q"], repo, env)
    assert digest_tree(repo / "data" / "raw") == before


def test_local_directory_remote_roundtrip(tmp_path):
    repo = make_repo(tmp_path)
    sh(DVC + ["remote", "add", "-d", "local", str(tmp_path / "remote")], repo)
    roundtrip(repo)
    assert any((tmp_path / "remote").rglob("*")), "nothing was pushed to the remote"


def test_s3_remote_roundtrip_against_local_endpoint(tmp_path):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_DEFAULT_REGION": "us-east-1"}
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
        s3.create_bucket(Bucket="dvc-store")
        repo = make_repo(tmp_path)
        sh(DVC + ["remote", "add", "-d", "s3store", "s3://dvc-store/flava"], repo)
        sh(DVC + ["remote", "modify", "s3store", "endpointurl", endpoint], repo)
        roundtrip(repo, env)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="dvc-store").get("Contents", [])]
        assert keys and all(k.startswith("flava/") for k in keys)
    finally:
        server.stop()
