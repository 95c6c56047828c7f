"""How a comparison is told: the runs' names, the markdown table, JAX / PyTorch ratios, and the
warning where the two ran on different hardware."""

from __future__ import annotations

import re
import string

FRAMEWORKS = {"jax": "JAX", "torch": "PyTorch"}
NONE = "–"  # a table cell with no figure


def label(key: str) -> str:
    """A run's name in the table and summary: encode keys its runs by framework, train by label."""
    return FRAMEWORKS.get(key, key)


def cell(fmt: str, result: dict) -> str:
    """A result's fields formatted, or NONE where one is None (device memory on the CPU)."""
    names = [name for _, name, _, _ in string.Formatter().parse(fmt) if name]
    return NONE if any(result[name] is None for name in names) else fmt.format(**result)


def table(results: dict, columns: tuple[tuple[str, str], ...]) -> str:
    """Markdown; each column is (header, format of a result's fields); numbers are right-aligned."""
    rows = [[label(key)] + [cell(fmt, r) for _, fmt in columns] for key, r in results.items()]
    numeric = [all(re.fullmatch(r"[-+0-9.e]+|" + NONE, row[i + 1]) for row in rows) for i in range(len(columns))]
    lines = ["| framework | " + " | ".join(header for header, _ in columns) + " |",
             "|---|" + "".join("---:|" if n else "---|" for n in numeric)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def speed_ratio(jax_r: dict, torch_r: dict) -> tuple[dict, str]:
    """JAX / PyTorch tokens/s, and per device where JAX ran on a mesh of several (PyTorch on one)."""
    ratio = jax_r["tokens_per_s"] / torch_r["tokens_per_s"]
    devices = jax_r.get("devices", 1)
    if devices == 1:
        return {"tokens_per_s_ratio": ratio}, f"{ratio:.2f}"
    per_device = ratio / devices
    return ({"tokens_per_s_ratio": ratio, "tokens_per_s_ratio_per_device": per_device},
            f"{ratio:.2f} (JAX on {devices} devices, PyTorch on one: {per_device:.2f} per device)")


def device_mismatch(results: dict) -> str | None:
    """A warning where one framework ran on the CPU and the other on an accelerator (torch without
    CUDA on a GPU machine, say): the ratio then compares two kinds of hardware."""
    if len({r["device_kind"] == "cpu" for r in results.values()}) == 1:
        return None
    return ("WARNING: " + ", ".join(f"{label(key)} ran on {r['device']}" for key, r in results.items())
            + ": the ratio compares different hardware")
