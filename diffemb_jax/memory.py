"""How much memory there is to fill: the device's (what the allocator may hand out) and the host's
(what the kernel says is available now), for the plans and benches that say whether something fits."""

from __future__ import annotations

from pathlib import Path


def available_host_mb() -> float:
    """MemAvailable of /proc/meminfo, in MiB (Linux)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise OSError("/proc/meminfo has no MemAvailable")


def compiled_bytes(stats) -> int:
    """What a compiled program holds at its peak, from its memory_analysis(): arguments, temporaries
    and outputs, less the outputs written in place of donated arguments."""
    return (stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes
            - stats.alias_size_in_bytes)


def device_capacity() -> tuple[str, float | None]:
    """(the device, the bytes it can hold): an accelerator's allocator limit (None where it gives
    none), or on the CPU the host memory available now."""
    import jax

    device = jax.devices()[0]
    if jax.default_backend() == "cpu":
        return "cpu", available_host_mb() * 2**20
    return device.device_kind, (device.memory_stats() or {}).get("bytes_limit")
