"""Write and submit a SLURM batch script that runs `diffemb train` on N GPU nodes, one JAX process each.

    python launch/slurm.py --nodes 2 --gpus-per-node 8 [--partition P] [--account A] [--time 24:00:00]
        [--output job.sbatch] [--dry-run] -- <diffemb train arguments>

The script asks for one task per node driving all of that node's GPUs, sets up .venv if it is missing
(`bash install.sh`, then `pip install -U "jax[cuda12]" flax`), and runs `srun .venv/bin/diffemb train ...`.
`diffemb train` starts JAX's distributed runtime, which reads SLURM_* (process count and id, the node
list for the coordinator): no coordinator address, process groups or RPC of our own. JAX's SLURM
detection would give each process only GPU $SLURM_LOCALID, which suits one task per GPU; with one
task per node the script exports JAX_LOCAL_DEVICE_IDS=0,...,G-1 so every process keeps all its GPUs.

--dry-run prints the script and the sbatch command (stdout; labels on stderr) and writes nothing.
Standard library only.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # launchers are scripts: share their helpers by path
from train_args import check_train_args, split_train_args  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
PIP_GPU_JAX = '.venv/bin/pip install -q -U "jax[cuda12]" flax'


def positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python launch/slurm.py", description=__doc__.split("\n\n")[0],
        usage="%(prog)s --nodes N --gpus-per-node G [options] -- <diffemb train arguments>")
    p.add_argument("--nodes", type=positive, required=True)
    p.add_argument("--gpus-per-node", type=positive, required=True)
    p.add_argument("--cpus-per-task", type=positive, default=None,
                   help="CPU cores of each node's process (default: 4 per GPU)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", default="24:00:00", help="wall-clock limit, SLURM syntax")
    p.add_argument("--job-name", default="diffemb-train")
    p.add_argument("--log", default="diffemb-train-%j.out", help="job output file (%%j: job id)")
    p.add_argument("--repo", default=str(REPO_ROOT),
                   help="the checkout every node runs from: the same path on all nodes (default: this one)")
    p.add_argument("--setup", choices=("once", "per-node", "none"), default="once",
                   help="make .venv if missing: once (repo on a shared filesystem), per-node (node-local "
                        "copies of the repo) or none")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable exported for diffemb train (repeatable)")
    p.add_argument("--output", default="diffemb-train.sbatch", help="where to write the batch script")
    p.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command; write nothing")
    return p


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = build_parser()
    own, train = split_train_args(argv)
    args = parser.parse_args(own)
    check_train_args(parser, train, "use a directory on the cluster's shared filesystem")
    if not (Path(args.repo) / "install.sh").is_file():
        parser.error(f"--repo {args.repo}: not a diffemb-jax checkout (no install.sh)")
    args.repo = str(Path(args.repo).resolve())
    for kv in args.env:
        if "=" not in kv or not kv.split("=", 1)[0].isidentifier():
            parser.error(f"--env {kv!r}: expected KEY=VALUE")
    return args, train


def build_script(args: argparse.Namespace, train: list[str]) -> str:
    cpus = args.cpus_per_task or 4 * args.gpus_per_node
    sbatch = {"job-name": args.job_name, "nodes": args.nodes, "ntasks-per-node": 1,
              "gpus-per-node": args.gpus_per_node, "cpus-per-task": cpus, "time": args.time,
              "partition": args.partition, "account": args.account, "output": args.log}
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH --{k}={v}" for k, v in sbatch.items() if v is not None]
    lines += ["set -euo pipefail", f"cd {shlex.quote(args.repo)}", ""]
    install = f"bash install.sh && {PIP_GPU_JAX}"
    if args.setup == "once":
        lines += ["# .venv (on the shared filesystem) once, here on the first node",
                  f"[ -x .venv/bin/diffemb ] || {{ {install}; }}"]
    elif args.setup == "per-node":
        node_setup = f"cd {shlex.quote(args.repo)} && {{ [ -x .venv/bin/diffemb ] || {{ {install}; }}; }}"
        lines += ["# .venv on every node (node-local copies of the repo)",
                  f"srun --nodes={args.nodes} --ntasks-per-node=1 bash -c {shlex.quote(node_setup)}"]
    lines += ["", "# one JAX process per node with all of its GPUs (JAX's SLURM default is GPU $SLURM_LOCALID only)",
              "export JAX_LOCAL_DEVICE_IDS=" + ",".join(str(i) for i in range(args.gpus_per_node))]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in (kv.split("=", 1) for kv in args.env)]
    lines += ["# JAX's distributed runtime reads SLURM_NTASKS, SLURM_PROCID and the node list: no coordinator to set",
              f"srun --nodes={args.nodes} --ntasks-per-node=1 --cpus-per-task={cpus} --kill-on-bad-exit=1 "
              f".venv/bin/diffemb train {shlex.join(train)}"]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide the script from the cluster's other users
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    args, train = parse_args(sys.argv[1:] if argv is None else argv)
    script = build_script(args, train)
    submit = ["sbatch", args.output]
    if args.dry_run:
        print(f"# would write {args.output}:", file=sys.stderr)
        sys.stdout.write(script)
        sys.stdout.flush()
        print("# would run:", file=sys.stderr, flush=True)
        print(shlex.join(submit), flush=True)
        return 0
    write_atomically(Path(args.output), script)
    print(f"wrote {args.output}; + {shlex.join(submit)}", file=sys.stderr, flush=True)
    try:
        return subprocess.run(submit).returncode
    except FileNotFoundError:
        print("slurm: sbatch not found: run this on the cluster's login node", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
