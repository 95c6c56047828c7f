"""What the launchers share: the `diffemb train` arguments after `--`, read and checked."""

from __future__ import annotations

import argparse


def split_train_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Launcher arguments | the arguments of `diffemb train` (everything after the first `--`)."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    train = argv[i + 1:]
    if train[:1] == ["train"]:  # `-- train --config ...` means the same thing
        train = train[1:]
    return argv[:i], train


def flag_value(args: list[str], name: str) -> str | None:
    """The value of `--name V` or `--name=V` in an absl-style argument list (the last one wins)."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a[len(name) + 1:]
    return value


def check_train_args(parser: argparse.ArgumentParser, train: list[str], shared_storage_hint: str) -> None:
    if not train:
        parser.error("no diffemb train arguments: put them after `--`, e.g. "
                     "-- --config configs/recipe.py:dream-7b,long_documents --workdir DIR "
                     "--config.model.path=MODEL --config.data.files=train.jsonl")
    for name in ("--config", "--workdir"):
        if not flag_value(train, name):
            parser.error(f"the diffemb train arguments after `--` have no {name}")
    workdir = flag_value(train, "--workdir")
    if "://" in workdir:
        parser.error(f"--workdir {workdir}: diffemb train writes its workdir with local file operations, so a URL "
                     f"is not a workdir; {shared_storage_hint}")
