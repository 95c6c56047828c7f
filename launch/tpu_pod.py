"""Run `diffemb train` on every worker of a Cloud TPU VM slice, through gcloud alone.

    python launch/tpu_pod.py --tpu NAME --zone ZONE [--project P] [--create --accelerator-type v5p-8]
        [--repo URL_OR_DIR [--branch B]] [--skip-setup] [--dry-run] -- <diffemb train arguments>

Steps, each one gcloud (or tar) command, run in order; the first failure stops the launcher with its
exit code:
  1. only with --create: `gcloud compute tpus tpu-vm create` (nothing is created otherwise);
  2. the code onto all workers: `git clone` of a URL, or a tarball of a local checkout (without .venv,
     .git, caches) copied with `tpu-vm scp --worker=all`;
  3. the environment on all workers: `bash install.sh`, then `pip install -U "jax[tpu]" flax`
     (install.sh installs the CPU jax; the TPU build replaces it, and a flax that matches it);
  4. the same `.venv/bin/diffemb train ...` on all workers (`tpu-vm ssh --worker=all`). Each worker is
     one JAX process; `diffemb train` starts JAX's distributed runtime, which reads the slice's
     topology from the TPU VM metadata: no coordinator address, process ids or RPC of our own.

--dry-run prints every command, one per line, shell-quoted, and runs nothing. Standard library only.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # launchers are scripts: share their helpers by path
from train_args import check_train_args, split_train_args  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
# Software versions ("--version" of `tpu-vm create`) by accelerator family (Cloud TPU docs).
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
TARBALL_EXCLUDES = (".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache", "./build", "./runs")
PIP_TPU_JAX = '.venv/bin/pip install -q -U "jax[tpu]" flax'


def accelerator_type(name: str) -> str:
    """gcloud's name for a slice: v5e-N is called v5litepod-N."""
    return "v5litepod-" + name[len("v5e-"):] if name.startswith("v5e-") else name


def runtime_version(accel: str) -> str | None:
    return RUNTIME_VERSIONS.get(accel.rsplit("-", 1)[0])


def is_git_url(repo: str) -> bool:
    return "://" in repo or repo.startswith("git@")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python launch/tpu_pod.py", description=__doc__.split("\n\n")[0],
        usage="%(prog)s --tpu NAME --zone ZONE [options] -- <diffemb train arguments>")
    p.add_argument("--tpu", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True, help="e.g. us-east5-a")
    p.add_argument("--project", default=None, help="Google Cloud project (default: gcloud's)")
    p.add_argument("--create", action="store_true", help="create the TPU VM first (otherwise it must exist)")
    p.add_argument("--accelerator-type", default="v5p-8",
                   help="with --create: slice type, e.g. v5p-8, v5e-32 (= v5litepod-32), v6e-16")
    p.add_argument("--version", default=None,
                   help="with --create: TPU software version (default by type: "
                        + ", ".join(f"{k}: {v}" for k, v in RUNTIME_VERSIONS.items()) + ")")
    p.add_argument("--repo", default=str(REPO_ROOT),
                   help="git URL to clone on the workers, or a local checkout to copy (default: this one)")
    p.add_argument("--branch", default=None, help="with a git URL: branch or tag to check out (default: main)")
    p.add_argument("--remote-dir", default="diffemb-jax", help="checkout on the workers, relative to $HOME")
    p.add_argument("--python", default=None,
                   help="interpreter install.sh makes .venv with (Python >= 3.11; default: install.sh's choice)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for diffemb train (repeatable)")
    p.add_argument("--skip-setup", action="store_true",
                   help="the workers already have the code and .venv: only run diffemb train")
    p.add_argument("--dry-run", action="store_true", help="print the commands, one per line, and run nothing")
    return p


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = build_parser()
    own, train = split_train_args(argv)
    args = parser.parse_args(own)
    check_train_args(parser, train, "mount the bucket on every worker (gcsfuse) or use a shared filesystem (Filestore/NFS) and pass that path")
    args.accelerator_type = accelerator_type(args.accelerator_type)
    if args.create and not (args.version or runtime_version(args.accelerator_type)):
        parser.error(f"no default --version for {args.accelerator_type}: pass --version (the TPU software version)")
    if not args.skip_setup:
        if is_git_url(args.repo):
            args.branch = args.branch or "main"
        else:
            if args.branch:
                parser.error("--branch applies to a git URL; a local --repo is copied as it is")
            repo = Path(args.repo).expanduser().resolve()
            if not (repo / "install.sh").is_file():
                parser.error(f"--repo {args.repo}: not a diffemb-jax checkout (no install.sh) and not a git URL")
            args.repo = str(repo)
    for kv in args.env:
        if "=" not in kv or not kv.split("=", 1)[0].isidentifier():
            parser.error(f"--env {kv!r}: expected KEY=VALUE")
    return args, train


def gcloud_tpu(verb: str, args: argparse.Namespace, *rest: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def on_all_workers(args: argparse.Namespace, script: str) -> list[str]:
    return [*gcloud_tpu("ssh", args, args.tpu, "--worker=all"), f"--command={script}"]


def tarball(args: argparse.Namespace) -> str:
    return str(Path(tempfile.gettempdir()) / f"diffemb-jax-{args.tpu}.tar.gz")


def build_commands(args: argparse.Namespace, train: list[str]) -> list[list[str]]:
    """Every command, in order, as argument lists."""
    cmds = []
    if args.create:
        cmds.append(gcloud_tpu("create", args, args.tpu, f"--accelerator-type={args.accelerator_type}",
                               f"--version={args.version or runtime_version(args.accelerator_type)}"))
    remote = shlex.quote(args.remote_dir)
    if not args.skip_setup:
        install = "bash install.sh" if args.python is None else f"PYTHON={shlex.quote(args.python)} bash install.sh"
        setup = f"cd {remote} && {install} && {PIP_TPU_JAX}"
        if is_git_url(args.repo):
            branch = shlex.quote(args.branch)
            fetch = (f"if [ -d {remote}/.git ]; then git -C {remote} fetch --depth 1 origin {branch}"
                     f" && git -C {remote} checkout --force FETCH_HEAD;"
                     f" else git clone --depth 1 --branch {branch} {shlex.quote(args.repo)} {remote}; fi")
            cmds.append(on_all_workers(args, f"{fetch} && {setup}"))
        else:
            archive = tarball(args)
            cmds.append(["tar", "-czf", archive, *(f"--exclude={x}" for x in TARBALL_EXCLUDES), "-C", args.repo, "."])
            cmds.append(gcloud_tpu("scp", args, archive, f"{args.tpu}:diffemb-jax.tar.gz", "--worker=all"))
            unpack = f"mkdir -p {remote} && tar -xzf diffemb-jax.tar.gz -C {remote} && rm diffemb-jax.tar.gz"
            cmds.append(on_all_workers(args, f"{unpack} && {setup}"))
    env = "".join(f"{k}={shlex.quote(v)} " for k, v in (kv.split("=", 1) for kv in args.env))
    cmds.append(on_all_workers(args, f"cd {remote} && {env}.venv/bin/diffemb train {shlex.join(train)}"))
    return cmds


def run(cmds: list[list[str]]) -> int:
    for cmd in cmds:
        print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
        try:
            code = subprocess.run(cmd).returncode
        except FileNotFoundError:
            print(f"tpu_pod: {cmd[0]} not found: install the Google Cloud CLI (gcloud)", file=sys.stderr)
            return 127
        if code:
            print(f"tpu_pod: exit code {code} from: {shlex.join(cmd)}", file=sys.stderr)
            return code
    return 0


def main(argv: list[str] | None = None) -> int:
    args, train = parse_args(sys.argv[1:] if argv is None else argv)
    cmds = build_commands(args, train)
    if args.dry_run:
        for cmd in cmds:
            print(shlex.join(cmd))
        return 0
    return run(cmds)


if __name__ == "__main__":
    sys.exit(main())
