"""Who starts JAX's distributed runtime: the decision table of parallel.initialize_distributed, with
each cluster kind's environment faked. JAX's own detection runs for real where it can here (no
cluster; a one-task SLURM job on localhost); a Cloud TPU VM shows no environment variable at all
(its peers come from the metadata server), so there the test checks JAX is asked to detect."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest

from diffemb_jax import parallel

_PROBE = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
import jax
from diffemb_jax import parallel
started = parallel.initialize_distributed(sys.argv[1])
print("RESULT", started, jax.process_count())
"""
_CLUSTER_VARIABLES = ("SLURM_", "TPU_", "OMPI_", "MEGASCALE_", "PMI_")


def _probe(mode: str, **env) -> tuple[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_VARIABLES)}
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], env={**clean, "JAX_PLATFORMS": "cpu", **env},
                          capture_output=True, text=True, timeout=120)
    return done.stdout, done.stderr


_SLURM_ONE_TASK = dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="1", SLURM_PROCID="0",
                       SLURM_LOCALID="0")


@pytest.mark.parametrize("mode, env, started", [
    ("auto", {}, False),  # a single host: JAX finds no cluster
    ("auto", _SLURM_ONE_TASK, True),  # SLURM: JAX's detection starts it (the old rule wanted SLURM_NTASKS > 1)
    ("off", _SLURM_ONE_TASK, False),
])
def test_jax_detection_decides(mode, env, started):
    out, err = _probe(mode, **env)
    assert f"RESULT {started} 1" in out, err
    if started:
        assert "distributed runtime started (SLURM)" in err
    else:
        assert ("no cluster detected" if mode == "auto" else "distributed=off") in err


def test_on_without_a_cluster_is_an_error():
    out, err = _probe("on")
    assert "RESULT" not in out and "coordinator_address" in err


def test_a_tpu_vm_is_left_to_jax(monkeypatch):
    """No SLURM_NTASKS, no TPU_WORKER_HOSTNAMES: the old rule skipped the start and every host of a
    pod trained alone. Now JAX is always asked; its metadata-server detection finds the peers."""
    for k in [k for k in os.environ if k.startswith(_CLUSTER_VARIABLES)]:
        monkeypatch.delenv(k)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert parallel.initialize_distributed("auto") is True
    assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None)]


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="distributed must be one of"):
        parallel.initialize_distributed("yes")


def test_too_late_to_start_is_one_process_in_auto_and_an_error_when_on():
    jax.devices()  # JAX runs in this process already, as in a notebook or a test
    assert parallel.initialize_distributed("auto") is False
    with pytest.raises(RuntimeError, match="before any JAX calls"):
        parallel.initialize_distributed("on")
