"""Tables of a Hugging Face dataset repository, read offline from a local copy or the HF cache.

Benchmarks (LongEmbed, BRIGHT, FollowIR) ship as dataset repositories with several configs, each
with named splits. `open_dataset` takes either a folder holding a copy of such a repository
(`hf download dwzhu/LongEmbed --repo-type dataset --local-dir LongEmbed`) or a repository id that
is already in the HF cache; nothing is downloaded. `read_split` finds a (config, split)'s files
the way the Hub does: from the `configs:` block of the dataset card's YAML header when the card has
one, else by the Hub's folder conventions (`CONFIG/SPLIT.jsonl`, `CONFIG/SPLIT-00000-of-00001.parquet`,
`CONFIG/data/SPLIT-*.parquet`). Rows come back as dicts; .parquet, .jsonl and .json are read.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffemb_jax.embedding.files import InputError, jsonl_objects

EXTENSIONS = (".parquet", ".jsonl", ".json")


def open_dataset(source: str | Path) -> Path:
    """The folder of a dataset repository: `source` itself if it is a folder, else the cached snapshot
    of the repository id `source` (HF cache, offline)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if str(source).count("/") != 1 or path.exists():
        raise InputError(f"{source}: no such folder; give a local copy of the dataset repository or its "
                         "Hugging Face id (owner/name) if it is in the HF cache")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(source), repo_type="dataset", local_files_only=True))
    except LocalEntryNotFoundError:
        raise InputError(f"{source}: not a folder, and the dataset is not in the Hugging Face cache (nothing is "
                         f"downloaded here); on a machine with network run `hf download {source} --repo-type "
                         "dataset --local-dir DIR` and pass DIR") from None


def read_split(root: Path, config: str, split: str) -> list[dict]:
    """All rows of split `split` of config `config`, in file order."""
    files = _split_files(root, config, split)
    if not files:
        raise InputError(f"{root}: no files for config {config!r}, split {split!r} (looked for the dataset "
                         f"card's `configs:` entry and for {config}/{split}.jsonl, {config}/{split}-*.parquet "
                         "and the like); is this the right dataset folder?")
    rows: list[dict] = []
    for file in files:
        rows.extend(_read_file(file))
    return rows


def read_config(root: Path, config: str, split: str = "test") -> list[dict]:
    """Rows of `split` of a config, or of the config's only split when it has no split of that name
    (MTEB's repositories name the single split of some configs after the config)."""
    if _split_files(root, config, split):
        return read_split(root, config, split)
    splits = _card_configs(root).get(config)
    if splits is not None and len(splits) == 1:
        return read_split(root, config, next(iter(splits)))
    files = sorted(p for p in _config_dir(root, config).rglob("*") if p.is_file() and p.suffix in EXTENSIONS)
    if splits is None and files:
        return [row for file in files for row in _read_file(file)]
    return read_split(root, config, split)  # raises, naming what was looked for


def has_config(root: Path, config: str) -> bool:
    return config in _card_configs(root) or _config_dir(root, config).is_dir()


def _config_dir(root: Path, config: str) -> Path:
    """Where a config's files lie without a card: CONFIG/, or data/ for the Hub's "default" config."""
    if config == "default" and not (root / config).is_dir():
        return root / "data"
    return root / config


def _split_files(root: Path, config: str, split: str) -> list[Path]:
    card = _card_configs(root)
    if config in card:
        patterns = card[config].get(split, [])
    else:
        base = _config_dir(root, config).relative_to(root).as_posix()
        patterns = [f"{base}/{split}{ext}" for ext in EXTENSIONS] + [
            f"{base}/{split}-*{ext}" for ext in EXTENSIONS] + [f"{base}/data/{split}-*{ext}" for ext in EXTENSIONS]
    files = []
    for pattern in patterns:
        files.extend(sorted(p for p in root.glob(pattern) if p.is_file() and p.suffix in EXTENSIONS))
    return list(dict.fromkeys(files))


def _card_configs(root: Path) -> dict[str, dict[str, list[str]]]:
    """{config: {split: [path patterns]}} from README.md's YAML `configs:` block ({} without one)."""
    card = root / "README.md"
    if not card.is_file():
        return {}
    text = card.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    import yaml

    try:
        header = yaml.safe_load(text[3:end]) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{card}: the YAML header does not parse ({e})") from e
    configs = {}
    for entry in header.get("configs") or []:
        if not isinstance(entry, dict) or "config_name" not in entry:
            continue
        configs[str(entry["config_name"])] = _data_files(entry.get("data_files"))
    return configs


def _data_files(spec) -> dict[str, list[str]]:
    """The card's data_files (a pattern, a list of them, or a list of {split, path}) by split."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        return {"train": [spec]}
    by_split: dict[str, list[str]] = {}
    for item in spec if isinstance(spec, list) else [spec]:
        if isinstance(item, str):
            by_split.setdefault("train", []).append(item)
        elif isinstance(item, dict):
            paths = item.get("path", [])
            by_split.setdefault(str(item.get("split", "train")), []).extend(
                [paths] if isinstance(paths, str) else list(paths))
    return by_split


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".json":
        text = path.read_text(encoding="utf-8-sig")
        if text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
            if not all(isinstance(r, dict) for r in rows):
                raise InputError(f"{path}: expected a JSON list of objects")
            return rows
    return [row for _, row in jsonl_objects(path)]


def field(row: dict, key: str, where: str):
    """row[key], or an InputError naming the table and the fields it has."""
    if key not in row:
        raise InputError(f"{where}: rows have no field {key!r} (fields: {', '.join(sorted(row))})")
    return row[key]

