"""A tiny model and a small echo-format training file, for training tests."""

import json
import random
from pathlib import Path

import tiny


def write_training_data(path: Path, rows: int = 48, seed: int = 0) -> Path:
    """Queries of 4 words; the positive repeats them shuffled with 2 more; the negative shares none."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            words = rng.sample(tiny.WORDS, 10)
            query, extra, negative = words[:4], words[4:6], words[6:10]
            positive = query + extra
            rng.shuffle(positive)
            f.write(json.dumps({"query": " ".join(query), "positive": " ".join(positive),
                                "negative": " ".join(negative), "instruction": "find the text"}) + "\n")
    return path


def tiny_setup(root: Path, family: str = "qwen2") -> tuple[Path, Path]:
    model = tiny.write_checkpoint(family, root / "model")
    data = write_training_data(root / "train.jsonl")
    return model, data


def train_args(model: Path, data: Path, workdir: Path, *extra: str) -> list[str]:
    config = Path(__file__).parent.parent / "configs" / "tiny.py"
    return ["train", f"--config={config}", f"--workdir={workdir}", f"--config.model.path={model}",
            f"--config.data.files={data}", *extra]
