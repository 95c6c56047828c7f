"""The TPU pod and SLURM launchers: the exact commands of their dry runs, argument errors, and that a
dry run runs and writes nothing. No gcloud, TPU or SLURM here: real runs go to fake `gcloud`, `tar`
and `sbatch` executables on PATH that log their arguments."""

from __future__ import annotations

import importlib.util
import os
import shlex
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
TRAIN = ["--config", "configs/recipe.py:dream-7b,long_documents", "--workdir", "/mnt/shared/runs/dream",
         "--config.model.path=/mnt/shared/models/dream", "--config.data.files=/mnt/shared/my data/echo.jsonl",
         "--config.mesh.data=1", "--config.mesh.fsdp=4"]


def load(name):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", LAUNCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tpu_pod, slurm = load("tpu_pod"), load("slurm")


@pytest.fixture
def no_subprocess(monkeypatch, tmp_path):
    """subprocess refuses to run anything; the working directory is an empty temporary one."""
    monkeypatch.chdir(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError(f"a dry run ran {args}")

    for name in ("run", "Popen", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)


def dry_run(module, argv, capsys):
    assert module.main(["--dry-run", *argv]) == 0
    return capsys.readouterr()


def remote_script(cmd: list[str]) -> str:
    assert cmd[-1].startswith("--command=")
    return cmd[-1][len("--command="):]


# ------------------------------------------------------------------ TPU pod


def test_tpu_dry_run_local_checkout(no_subprocess, capsys):
    out = dry_run(tpu_pod, ["--tpu", "pod", "--zone", "us-east5-a", "--project", "proj", "--", *TRAIN], capsys).out
    lines = out.splitlines()
    archive = str(Path(tempfile.gettempdir()) / "diffemb-jax-pod.tar.gz")
    flags = ["--zone=us-east5-a", "--project=proj"]
    expected = [
        ["tar", "-czf", archive, "--exclude=.venv", "--exclude=.git", "--exclude=__pycache__", "--exclude=*.egg-info",
         "--exclude=.pytest_cache", "--exclude=./build", "--exclude=./runs", "-C", str(REPO), "."],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, "pod:diffemb-jax.tar.gz", "--worker=all", *flags],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--worker=all", *flags,
         "--command=mkdir -p diffemb-jax && tar -xzf diffemb-jax.tar.gz -C diffemb-jax && rm diffemb-jax.tar.gz"
         ' && cd diffemb-jax && bash install.sh && .venv/bin/pip install -q -U "jax[tpu]" flax'],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--worker=all", *flags,
         "--command=cd diffemb-jax && .venv/bin/diffemb train " + shlex.join(TRAIN)],
    ]
    assert [shlex.split(line) for line in lines] == expected  # one command a line, quoted for a shell
    assert "create" not in out  # nothing is created unless asked


def test_tpu_train_args_pass_through_verbatim(no_subprocess, capsys):
    """Two shells unquote the train command (the local one, then the worker's): both give back TRAIN."""
    out = dry_run(tpu_pod, ["--tpu", "pod", "--zone", "z", "--skip-setup", "--", *TRAIN], capsys).out
    (line,) = out.splitlines()
    script = remote_script(shlex.split(line))
    assert "'--config.data.files=/mnt/shared/my data/echo.jsonl'" in script
    cd, train = script.split(" && ")
    assert cd == "cd diffemb-jax"
    assert shlex.split(train) == [".venv/bin/diffemb", "train", *TRAIN]


def test_tpu_create_only_when_asked(no_subprocess, capsys):
    out = dry_run(tpu_pod, ["--tpu", "pod", "--zone", "z", "--create", "--skip-setup", "--", *TRAIN], capsys).out
    create = shlex.split(out.splitlines()[0])
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", "--accelerator-type=v5p-8",
                      "--version=v2-alpha-tpuv5", "--zone=z"]
    out = dry_run(tpu_pod, ["--tpu", "pod", "--zone", "z", "--create", "--accelerator-type", "v5e-32",
                            "--skip-setup", "--", *TRAIN], capsys).out
    assert "--accelerator-type=v5litepod-32 --version=v2-alpha-tpuv5-lite" in out.splitlines()[0]
    out = dry_run(tpu_pod, ["--tpu", "pod", "--zone", "z", "--accelerator-type", "v5e-32", "--skip-setup",
                            "--", *TRAIN], capsys).out
    assert " create " not in out and len(out.splitlines()) == 1


def test_tpu_git_clone_and_env(no_subprocess, capsys):
    url = "https://github.com/someone/diffemb-jax.git"
    out = dry_run(tpu_pod, ["--tpu", "pod", "--zone", "z", "--repo", url, "--branch", "dev", "--python", "python3.11",
                            "--env", "XLA_FLAGS=--xla_a --xla_b", "--", "train", *TRAIN], capsys).out
    setup, train = (remote_script(shlex.split(line)) for line in out.splitlines())
    assert setup == ("if [ -d diffemb-jax/.git ]; then git -C diffemb-jax fetch --depth 1 origin dev"
                     " && git -C diffemb-jax checkout --force FETCH_HEAD;"
                     f" else git clone --depth 1 --branch dev {url} diffemb-jax; fi"
                     " && cd diffemb-jax && PYTHON=python3.11 bash install.sh"
                     ' && .venv/bin/pip install -q -U "jax[tpu]" flax')
    assert shlex.split(train.split(" && ")[1]) == ["XLA_FLAGS=--xla_a --xla_b", ".venv/bin/diffemb", "train", *TRAIN]


@pytest.mark.parametrize("argv, message", [
    (["--zone", "z", "--", *TRAIN], "--tpu"),
    (["--tpu", "t", "--", *TRAIN], "--zone"),
    (["--tpu", "t", "--zone", "z"], "no diffemb train arguments"),
    (["--tpu", "t", "--zone", "z", "--"], "no diffemb train arguments"),
    (["--tpu", "t", "--zone", "z", "--", "--workdir", "w"], "no --config"),
    (["--tpu", "t", "--zone", "z", "--", "--config", "c"], "no --workdir"),
    (["--tpu", "t", "--zone", "z", "--", "--config", "c", "--workdir=gs://bucket/run"], "gcsfuse"),
    (["--tpu", "t", "--zone", "z", "--create", "--accelerator-type", "v9-8", "--", *TRAIN], "--version"),
    (["--tpu", "t", "--zone", "z", "--repo", "/nonexistent", "--", *TRAIN], "not a diffemb-jax checkout"),
    (["--tpu", "t", "--zone", "z", "--branch", "dev", "--", *TRAIN], "--branch applies to a git URL"),
    (["--tpu", "t", "--zone", "z", "--env", "NOEQUALS", "--", *TRAIN], "KEY=VALUE"),
])
def test_tpu_argument_errors(no_subprocess, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        tpu_pod.main(["--dry-run", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------ SLURM


def test_slurm_dry_run_script(no_subprocess, capsys, tmp_path):
    job = tmp_path / "job.sbatch"
    captured = dry_run(slurm, ["--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--account", "acct",
                               "--time", "12:00:00", "--output", str(job), "--", *TRAIN], capsys)
    lines = captured.out.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert [line for line in lines if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=diffemb-train", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=32", "#SBATCH --time=12:00:00",
        "#SBATCH --partition=gpu", "#SBATCH --account=acct", "#SBATCH --output=diffemb-train-%j.out"]
    assert f"cd {REPO}" in lines
    assert '[ -x .venv/bin/diffemb ] || { bash install.sh && .venv/bin/pip install -q -U "jax[cuda12]" flax; }' in lines
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in lines
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert shlex.split(srun) == ["srun", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=32",
                                 "--kill-on-bad-exit=1", ".venv/bin/diffemb", "train", *TRAIN]
    assert lines[-1] == shlex.join(["sbatch", str(job)])
    assert "would write" in captured.err and "would run" in captured.err
    assert not job.exists()


def test_slurm_script_is_valid_bash(capsys, monkeypatch, tmp_path):
    """`bash -n` parses the generated script (syntax only; nothing in it is executed)."""
    monkeypatch.chdir(tmp_path)
    captured = dry_run(slurm, ["--nodes", "2", "--gpus-per-node", "8", "--setup", "per-node",
                               "--env", "XLA_FLAGS=--a --b", "--", *TRAIN], capsys)
    script = captured.out.rsplit("sbatch ", 1)[0]
    assert "export XLA_FLAGS='--a --b'" in script
    (setup,) = [line for line in script.splitlines() if line.startswith("srun") and "install.sh" in line]
    assert shlex.split(setup)[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "bash"]
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert not list(tmp_path.iterdir())


def test_slurm_setup_none_and_defaults(no_subprocess, capsys):
    out = dry_run(slurm, ["--nodes", "1", "--gpus-per-node", "4", "--setup", "none", "--", *TRAIN], capsys).out
    assert "install.sh" not in out
    assert "#SBATCH --cpus-per-task=16" in out and "#SBATCH --time=24:00:00" in out
    assert "partition" not in out and "account" not in out
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in out


@pytest.mark.parametrize("argv, message", [
    (["--gpus-per-node", "8", "--", *TRAIN], "--nodes"),
    (["--nodes", "2", "--", *TRAIN], "--gpus-per-node"),
    (["--nodes", "0", "--gpus-per-node", "8", "--", *TRAIN], "not a positive integer"),
    (["--nodes", "2", "--gpus-per-node", "8"], "no diffemb train arguments"),
    (["--nodes", "2", "--gpus-per-node", "8", "--", "--config", "c"], "no --workdir"),
    (["--nodes", "2", "--gpus-per-node", "8", "--", "--config", "c", "--workdir", "gs://b/r"], "shared filesystem"),
    (["--nodes", "2", "--gpus-per-node", "8", "--setup", "twice", "--", *TRAIN], "--setup"),
])
def test_slurm_argument_errors(no_subprocess, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        slurm.main(["--dry-run", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------ as programs, with fake tools on PATH


@pytest.fixture
def fake_tools(tmp_path):
    """`gcloud`, `tar` and `sbatch` that append their arguments to calls.log; gcloud fails with code 7 on
    `ssh` when FAIL_SSH is set."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for tool in ("gcloud", "tar", "sbatch"):
        fail = 'case "$*" in *" ssh "*) [ -n "${FAIL_SSH:-}" ] && exit 7;; esac\n' if tool == "gcloud" else ""
        path = bin_dir / tool
        path.write_text(f'#!/bin/sh\necho "{tool} $*" >> {shlex.quote(str(log))}\n{fail}exit 0\n')
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return env, log


def run_launcher(name, argv, env, cwd):
    return subprocess.run([sys.executable, str(LAUNCH / f"{name}.py"), *argv], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_dry_runs_as_programs_touch_nothing(fake_tools, tmp_path):
    env, log = fake_tools
    work = tmp_path / "cwd"
    work.mkdir()
    r = run_launcher("tpu_pod", ["--tpu", "pod", "--zone", "z", "--create", "--dry-run", "--", *TRAIN], env, work)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 5
    r = run_launcher("slurm", ["--nodes", "2", "--gpus-per-node", "8", "--dry-run", "--", *TRAIN], env, work)
    assert r.returncode == 0, r.stderr
    assert not log.exists() and not list(work.iterdir())  # no tool ran, no file written


def test_tpu_real_run_stops_at_first_failure(fake_tools, tmp_path):
    env, log = fake_tools
    argv = ["--tpu", "pod", "--zone", "z", "--", *TRAIN]
    r = run_launcher("tpu_pod", argv, env, tmp_path)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["tar", "gcloud", "gcloud", "gcloud"]
    assert calls[-1].startswith("gcloud compute tpus tpu-vm ssh pod --worker=all --zone=z --command=cd diffemb-jax")
    log.unlink()
    r = run_launcher("tpu_pod", argv, {**env, "FAIL_SSH": "1"}, tmp_path)
    assert r.returncode == 7
    assert len(log.read_text().splitlines()) == 3  # tar, scp, the failing ssh; training never started
    assert "exit code 7" in r.stderr


def test_slurm_real_run_writes_and_submits(fake_tools, tmp_path):
    env, log = fake_tools
    job = tmp_path / "jobs" / "train.sbatch"
    r = run_launcher("slurm", ["--nodes", "2", "--gpus-per-node", "8", "--output", str(job), "--", *TRAIN],
                     env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert log.read_text().splitlines() == [f"sbatch {job}"]
    dry = run_launcher("slurm", ["--nodes", "2", "--gpus-per-node", "8", "--output", str(job), "--dry-run",
                                 "--", *TRAIN], env, tmp_path)
    assert dry.stdout == job.read_text() + shlex.join(["sbatch", str(job)]) + "\n"
