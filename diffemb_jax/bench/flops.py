"""Model FLOPs of the useful work (the formulas, checked against torch's FLOP counter), model TFLOP/s
and MFU against a device's peak."""

from __future__ import annotations

from diffemb_jax.bench.report import label

# Matrix products only (2 FLOPs per multiply-add), of the useful work: each text at its own length n,
# padding not counted, though both frameworks compute on it (so this is model FLOPs, as in MFU).
FORWARD_FORMULA = ("forward, per text of n tokens: n x L x (2 x P + 2 x r x S) + 4 x L x n^2 x H x hd, "
                   "L layers, P = sum over a block's 7 projections of d_in x d_out, S = sum of d_in + d_out (LoRA "
                   "x @ A @ B, r = 0 without LoRA), H x hd = query width (QK^T and PV over n keys)")
TRAIN_FORMULA = ("train = forward + backward; backward: n x L x (2 x P + 4 x r x S) + 8 x L x n^2 x H x hd "
                 "- n x (2 x Pqkv + 2 x r x 3d): input gradients through the frozen base (no weight "
                 "gradients), dQ dK dV dP of attention, dA dB and input gradient of each adapter; the "
                 "first block's q, k, v take no input gradient (the embeddings are frozen)")


def _projections(cfg: dict) -> list[tuple[int, int]]:
    """(d_in, d_out) of a block's q, k, v, o, gate, up, down projections."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_heads"] * cfg["head_dim"], cfg["num_kv_heads"] * cfg["head_dim"]
    return [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]


def forward_flops(cfg: dict, n: int, rank: int = 0) -> int:
    """Model FLOPs of one forward pass over a text of n tokens (FORWARD_FORMULA); cfg: a ModelConfig as a dict."""
    proj = _projections(cfg)
    p, s = sum(i * o for i, o in proj), sum(i + o for i, o in proj)
    width = cfg["num_heads"] * cfg["head_dim"]
    return cfg["num_layers"] * (n * (2 * p + 2 * rank * s) + 4 * n * n * width)


def train_flops(cfg: dict, n: int, rank: int) -> int:
    """Model FLOPs of forward and backward of the LoRA train step for a text of n tokens (TRAIN_FORMULA)."""
    proj = _projections(cfg)
    p, s = sum(i * o for i, o in proj), sum(i + o for i, o in proj)
    width = cfg["num_heads"] * cfg["head_dim"]
    first_qkv = sum(i * o for i, o in proj[:3]) + rank * sum(i for i, _ in proj[:3])
    backward = cfg["num_layers"] * (n * (2 * p + 4 * rank * s) + 8 * n * n * width) - 2 * n * first_qkv
    return forward_flops(cfg, n, rank) + backward


# Dense peak TFLOP/s of accelerators the MFU is computed against without --peak-tflops (DESIGN.md).
KNOWN_PEAK_TFLOPS = {("H100", "bfloat16"): 989.0, ("H200", "bfloat16"): 989.0}


def peak_tflops(args_peak: float | None, device_kind: str, dtype: str) -> float | None:
    if args_peak is not None:
        return args_peak
    return next((v for (kind, dt), v in KNOWN_PEAK_TFLOPS.items() if kind in device_kind and dt == dtype), None)


def flops_summary(kind, job: dict, results: dict, peak: float | None) -> tuple[dict, list[str]]:
    """Model TFLOP/s of each run (into its result) and, where the peak is known, its MFU."""
    cfg = next(r["model_config"] for r in results.values() if r["framework"] == "jax")
    per_token, lines, unknown = {}, [], {}
    for key, r in results.items():
        flops, tokens, formula = kind.flops(job, cfg, r)
        per_token[key] = r["model_flops_per_token"] = flops / tokens
        ran = r.get("seconds") is not None
        r["model_tflops_per_s"] = flops / r["seconds"] / 1e12 if ran else None
        r["peak_tflops"] = peak_tflops(peak, r["device_kind"], job["dtype"])  # a device's
        devices = r.get("devices", 1)
        r["mfu"] = r["model_tflops_per_s"] / (r["peak_tflops"] * devices) if ran and r["peak_tflops"] else None
        if r["mfu"]:
            lines.append(f"{label(key)} MFU: {r['mfu']:.2%} of "
                         + (f"{devices} x " if devices > 1 else "") + f"{r['peak_tflops']:g} TFLOP/s")
        elif ran:
            unknown.setdefault(r["device_kind"], []).append(label(key))
    lines += [f"MFU of {', '.join(keys)}: unknown (no peak known for {device_kind} {job['dtype']}: pass --peak-tflops)"
              for device_kind, keys in unknown.items()]
    values = sorted(set(per_token.values()))
    head = (f"model FLOPs per token: {values[0] / 1e9:.4g} GFLOP" if len(values) == 1 else
            f"model FLOPs per token: {values[0] / 1e9:.4g} to {values[-1] / 1e9:.4g} GFLOP by length")
    lines = [head + ", from", *("  " + f for f in formula)] + lines
    return {"model_flops_per_token": values[0] if len(values) == 1 else None}, lines
