"""What diffemb makes once and reuses, in one directory: the converted demo model, the bench's random
weights, and XLA's compiled programs.

Compiling is a large part of a short job: every `diffemb encode|evaluate|train` call compiles its
programs anew (the encoder one per batch shape, the train step one per (rows, length) met), and a
resumed run compiles what the killed one had. JAX's persistent compilation cache keeps them on disk,
so a second call loads them instead. JAX's own settings win: `JAX_COMPILATION_CACHE_DIR` puts the
cache elsewhere, `JAX_ENABLE_COMPILATION_CACHE=false` turns it off. On several hosts JAX lets only
process 0 write it. JAX's cache key names the device kind but not the host CPU, whose instruction set
XLA compiles CPU code for: hosts of different CPUs sharing a home directory keep apart folders.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """$DIFFEMB_CACHE, else $XDG_CACHE_HOME/diffemb-jax (~/.cache/diffemb-jax)."""
    root = os.environ.get("DIFFEMB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diffemb-jax")
    return Path(root)


def host_cpu() -> str:
    """The host's architecture and a hash of its CPU's instruction-set flags (Linux's /proc/cpuinfo)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()}-{hashlib.sha256(flags.encode()).hexdigest()[:8]}"


def use_compilation_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache, in cache_dir()/xla/host_cpu() unless JAX was given a
    directory; the directory in use, or None where it is off. Call before the first compilation (it
    starts no backend: multi-host runs initialise theirs later)."""
    import jax

    if not jax.config.jax_enable_compilation_cache:
        return None
    if jax.config.jax_compilation_cache_dir is None:
        directory = cache_dir() / "xla" / host_cpu()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a read-only home: run without it rather than fail
            log.warning("no compilation cache (%s); every run compiles afresh", e)
            return None
        jax.config.update("jax_compilation_cache_dir", str(directory))
    return Path(jax.config.jax_compilation_cache_dir)
