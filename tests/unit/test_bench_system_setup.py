"""The system bench's setup: it names the files that ran by git's tree id of the checkout, not by HEAD (a device
machine's copy carries stale git metadata), and its profiler flag reaches the stage replicas."""
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


def test_profile_steps_reach_both_stage_replicas_environments(tmp_path: Path):
    """`--profile-steps` becomes CHATTERBOX_PROFILE_* in the T3 and S3Gen replicas' environments, as the app builds
    them from the bench's copy of the deploy file."""
    from bench.bench_system import effective_config, parse_args
    from serve_app.serving.config import load_deploy_file

    a = parse_args(["--config", "deploy/gpu-1x.yaml", "--out", str(tmp_path), "--profile-steps", "40",
                    "--profile-min-batch", "24,6"])
    raw, _ = effective_config(a)
    (tmp_path / "deploy.yaml").write_text(__import__("yaml").safe_dump(raw))
    config = load_deploy_file(tmp_path / "deploy.yaml").config
    t3_env = config.t3.ray_actor_options.runtime_env.env_vars
    s3_env = config.s3gen.ray_actor_options.runtime_env.env_vars
    assert t3_env["CHATTERBOX_PROFILE_DIR"] == s3_env["CHATTERBOX_PROFILE_DIR"] == str((tmp_path / "profile").resolve())
    assert (t3_env["CHATTERBOX_PROFILE_STEPS"], t3_env["CHATTERBOX_PROFILE_MIN_BATCH"]) == ("40", "24")
    assert (s3_env["CHATTERBOX_PROFILE_STEPS"], s3_env["CHATTERBOX_PROFILE_MIN_BATCH"]) == ("40", "6")
    assert not config.voice.ray_actor_options.runtime_env


def test_a_wall_budget_that_leaves_no_level_after_the_apps_start_is_refused(capsys):
    """--max-wall-s counts the app's start: three device calls measured nothing with 150-190 s (bench/README.md).
    The bench refuses such a budget before it starts anything (and says the floor); smoke runs and a running app
    have none."""
    from bench.bench_system import parse_args

    for wall in ("150", "170", "190"):
        with pytest.raises(SystemExit):
            parse_args(["--levels", "64", "--stream-modes", "stream", "--duration-s", "10", "--skip-upstream",
                        "--max-wall-s", wall])
        assert "counts the app's start" in capsys.readouterr().err
    ok = parse_args(["--levels", "64,128", "--duration-s", "12", "--skip-upstream", "--max-wall-s", "250"])
    assert ok.max_wall_s == 250
    with pytest.raises(SystemExit):   # upstream's time counts too
        parse_args(["--levels", "64", "--duration-s", "12", "--max-wall-s", "250"])
    assert parse_args(["--levels", "64", "--duration-s", "10", "--skip-upstream", "--max-wall-s", "150",
                       "--allow-short-wall"]).max_wall_s == 150
    assert parse_args(["--smoke", "--max-wall-s", "60"]).max_wall_s == 60
    assert parse_args(["--server-url", "http://127.0.0.1:8000", "--levels", "8", "--max-wall-s", "60"]).max_wall_s == 60
    canonical = ["--levels", "1,8,16,32,64,128", "--nostream-levels", "64", "--duration-s", "15",
                 "--upstream-requests", "3", "--max-wall-s", "420"]   # bench/README.md's canonical command
    assert parse_args(canonical).max_wall_s == 420


def test_variants_parse_to_s3gen_user_configs_and_label_their_levels():
    """--variant NAME:KEY=VALUE,...: keys of S3Gen's user_config only; the app is then started with --watch, and
    the report labels each variant's levels and says what was applied."""
    from bench.bench_system import parse_args, parse_variant
    from bench.system.report import markdown
    from bench.system.server import AppServer

    assert parse_variant("cover1:first_step_cover=1.0,urgent_steps=2") == (
        "cover1", {"first_step_cover": 1.0, "urgent_steps": 2})
    for bad in ("cover1", "cover1:", ":first_step_cover=1", "x:no_such_knob=1"):
        with pytest.raises(ValueError):
            parse_variant(bad)
    with pytest.raises(SystemExit):
        parse_args(["--smoke", "--variant", "x:first_step_cover=1", "--server-url", "http://127.0.0.1:1"])
    assert "--watch" in AppServer(Path("d.yaml"), log_path=Path("l"), watch=True).command()
    assert "--watch" not in AppServer(Path("d.yaml"), log_path=Path("l")).command()
    level = {"concurrency": 64, "stream": True, "requests": 1, "ok": 1, "errors": 0, "variant": "cover1"}
    md = markdown({"levels": [level], "upstream": {}, "variant_user_configs": {"cover1": {"first_step_cover": 1.0}},
                   "variants": {"cover1": {"seconds": 1.5, "s3gen_pid_before": 7, "s3gen_pid_after": 7}}})
    assert "| 64 [cover1] | yes |" in md
    assert "`cover1` {'first_step_cover': 1.0} (applied in 1.5 s; S3Gen pid 7 -> 7)" in md
