"""The system bench names the files that ran by git's tree id of the checkout, not by HEAD (a device machine's copy
carries stale git metadata)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench.bench_system import working_tree_id
from bench.system.report import markdown


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / ".gitignore").write_text("*.log\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "one")
    return tmp_path


def test_a_clean_checkout_is_its_commits_tree(repo: Path):
    assert working_tree_id(repo) == _git(repo, "rev-parse", "HEAD^{tree}")


def test_the_files_name_their_commit_even_when_head_is_stale(repo: Path):
    (repo / "a.py").write_text("x = 2\n")
    (repo / "new.py").write_text("y = 1\n")          # untracked, not ignored: it ran, so it counts
    (repo / "run.log").write_text("ignored\n")       # ignored files do not
    (repo / ".whl").mkdir()
    (repo / ".whl" / "site.tar.xz").write_bytes(b"bundle")   # carried, not ignored by the repo: excluded
    ran = working_tree_id(repo)
    assert ran != _git(repo, "rev-parse", "HEAD^{tree}")     # HEAD ("one") did not run
    assert _git(repo, "status", "--porcelain") != ""          # and the repo's own index was not touched
    assert "new.py" not in _git(repo, "diff", "--cached", "--name-only")
    _git(repo, "add", "a.py", "new.py")
    _git(repo, "commit", "-qm", "two")                        # the commit made from those files elsewhere
    assert ran == _git(repo, "rev-parse", "HEAD^{tree}")


def test_the_report_names_the_tree():
    line = markdown({"git_commit": "a" * 40, "git_dirty": True, "git_tree": "b" * 40}).splitlines()[2]
    assert "git aaaaaaaaaaaa (dirty), files = tree bbbbbbbbbbbb;" in line
