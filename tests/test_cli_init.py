"""`vaultflow init` and `vaultflow key` as a user runs them, on a local path and on an s3:// URL."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vaultflow.storage.repository import Repository


def run(args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "vaultflow", *args], env={**os.environ, **env},
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def cli_env(location, tmp_path):
    env = {"VAULTFLOW_REPOSITORY": location.url, "VAULTFLOW_PASSWORD": "s3cret pw", "VAULTFLOW_HOME": str(tmp_path)}
    if location.storage_options:
        env["VAULTFLOW_STORAGE_OPTIONS"] = json.dumps(location.storage_options)
    return env


def test_init_creates_a_repository_that_opens_with_the_password(location, cli_env):
    out = run(["init"], cli_env).stdout
    assert f"at {location.url}" in out
    repo = Repository.open(location.url, "s3cret pw", storage_options=location.storage_options)
    assert repo.config.id in out
    again = run(["init"], cli_env, check=False)
    assert again.returncode == 1 and "already holds a vaultflow repository" in again.stderr


def test_wrong_password_is_a_clean_error_not_a_traceback(location, cli_env):
    run(["init"], cli_env)
    bad = run(["key", "list"], {**cli_env, "VAULTFLOW_PASSWORD": "wrong"}, check=False)
    assert bad.returncode == 1
    assert "wrong password" in bad.stderr and "Traceback" not in bad.stderr


def test_key_add_list_and_passwd(location, cli_env):
    run(["init"], cli_env)
    run(["key", "add"], {**cli_env, "VAULTFLOW_NEW_PASSWORD": "second"})
    listing = run(["key", "list"], {**cli_env, "VAULTFLOW_PASSWORD": "second"}).stdout.splitlines()
    assert len(listing) == 2 and sum(line.startswith("*") for line in listing) == 1
    run(["key", "passwd"], {**cli_env, "VAULTFLOW_NEW_PASSWORD": "third"})
    assert run(["key", "list"], cli_env, check=False).returncode == 1
    assert len(run(["key", "list"], {**cli_env, "VAULTFLOW_PASSWORD": "third"}).stdout.splitlines()) == 2


def test_password_file_and_missing_password(tmp_path):
    repo = str(tmp_path / "r")
    pwfile = tmp_path / "pw"
    pwfile.write_text("from a file\n")
    env = {"VAULTFLOW_REPOSITORY": repo, "VAULTFLOW_PASSWORD": ""}
    run(["init", "--password-file", str(pwfile)], env)
    Repository.open(repo, "from a file")
    missing = run(["key", "list"], env, check=False)
    assert missing.returncode == 1 and "no password" in missing.stderr


def test_default_repository_lives_under_vaultflow_home(tmp_path):
    env = {"VAULTFLOW_HOME": str(tmp_path / "home"), "VAULTFLOW_PASSWORD": "pw", "VAULTFLOW_REPOSITORY": ""}
    run(["init"], env)
    Repository.open(str(tmp_path / "home" / "repo"), "pw")


def test_new_repositories_compress_at_level_1_unless_init_says_otherwise(tmp_path):
    env = {"VAULTFLOW_PASSWORD": "pw", "VAULTFLOW_HOME": str(tmp_path)}
    run(["init", "-r", str(tmp_path / "default")], env)
    assert Repository.open(str(tmp_path / "default"), "pw").config.compression_level == 1
    run(["init", "-r", str(tmp_path / "small"), "--compression-level", "19"], env)
    assert Repository.open(str(tmp_path / "small"), "pw").config.compression_level == 19
    bad = run(["init", "-r", str(tmp_path / "bad"), "--compression-level", "40"], env, check=False)
    assert bad.returncode == 1 and "zstd levels run from -7 to 19" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()
