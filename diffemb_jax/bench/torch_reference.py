"""The PyTorch reference of a bench run, in its worker process (which imports no JAX): transformers
(+ peft for the train step), batched and padded as the JAX side's batches are, bidirectional
attention, mean pooling, the same loss and optimizer."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import tokenizers
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from diffemb_jax.batching import SIDES

FRAMEWORK = "torch"


def _gguf_model(source: Path, dtype):
    """from_pretrained(gguf_file=...) wants accelerate; this is its loading, without it."""
    # Imported here: only a .gguf source needs it (and the gguf package).
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(source.parent), gguf_file=source.name)
    with torch.device("meta"):  # names only
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(source), return_tensors=True, model_to_load=skeleton)["tensors"]
    model = AutoModel.from_config(config, dtype=dtype, attn_implementation="sdpa")
    prefix = skeleton.base_model_prefix + "."
    model.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
    return model


def _device():
    """CUDA where torch sees a GPU, as JAX then runs on it too: the ratio compares one device. Else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _device_info(device) -> tuple[str, dict]:
    """(the device column, info): the GPU's name, or the CPU and the threads torch uses."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return name, {"device_kind": name, "devices": 1}
    return f"cpu, {torch.get_num_threads()} threads", {"device_kind": "cpu", "devices": 1}


def _model(source: Path, dtype: str, device):
    """The base model (no LM head) in eval mode on `device`, SDPA attention, on every core."""
    torch.set_num_threads(os.cpu_count())
    if source.suffix == ".gguf":
        model = _gguf_model(source, getattr(torch, dtype))
    else:
        model = AutoModel.from_pretrained(str(source), dtype=getattr(torch, dtype), attn_implementation="sdpa")
    return model.to(device).eval()


def embed(model, input_ids, padding):
    """Bidirectional attention via a 4-D boolean mask [B, 1, L, L]; mean pooling; L2 normalisation."""
    positions = (padding.long().cumsum(-1) - 1).clamp(min=0)
    mask = padding[:, None, None, :].expand(-1, 1, input_ids.shape[1], -1)
    hidden = model(input_ids=input_ids, attention_mask=mask, position_ids=positions).last_hidden_state.float()
    weights = padding.float()[..., None]
    return torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)


def encoder(job: dict):
    """Tokenised, sorted, batched and padded to bucket lengths the way Embedder.encode does it (the
    parent sends the rows per batch of each bucket: this process imports no JAX)."""
    device = _device()
    model = _model(Path(job["torch_source"]), job["dtype"], device)
    tokenizer = tokenizers.Tokenizer.from_file(job["tokenizer"])
    buckets, max_length = job["buckets"], job["max_length"]
    rows_per_batch = dict(zip(buckets, job["bucket_rows"]))

    @torch.inference_mode()
    def encode(texts):
        ids = [enc.ids[:max_length] for enc in tokenizer.encode_batch(texts)]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = torch.zeros(len(ids), model.config.hidden_size)
        start = 0
        while start < len(order):
            length = next(b for b in buckets if b >= len(ids[order[start]]))
            rows = order[start : start + rows_per_batch[length]]
            start += len(rows)
            input_ids = torch.zeros(len(rows), length, dtype=torch.long)
            padding = torch.zeros(len(rows), length, dtype=torch.bool)
            for r, i in enumerate(rows):
                input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
                padding[r, : len(ids[i])] = True
            out[rows] = embed(model, input_ids.to(device), padding.to(device)).cpu()  # .cpu() waits
        return out.numpy()

    return encode, *_device_info(device)


def sentence_transformer(job: dict, folder: Path):
    """(encode(texts) -> embeddings, the device column, info): sentence-transformers on the same weights
    (models.Transformer + mean Pooling + Normalize over the model written to `folder` as an HF
    directory with the bench's tokenizer), as one would serve the model without this project. Its
    attention is the model's own (causal for these LMs), its batches padded to their longest text."""
    from sentence_transformers import SentenceTransformer
    from transformers import PreTrainedTokenizerFast

    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Normalize, Pooling, Transformer
    device = _device()
    _model(Path(job["torch_source"]), job["dtype"], torch.device("cpu")).save_pretrained(folder)
    fast = PreTrainedTokenizerFast(tokenizer_file=job["tokenizer"])
    fast.pad_token = fast.pad_token or fast.convert_ids_to_tokens(0)
    fast.save_pretrained(folder)
    words = Transformer(str(folder), max_seq_length=job["max_length"])
    model = SentenceTransformer(modules=[words, Pooling(words.get_embedding_dimension(), "mean"), Normalize()],
                                device=str(device))

    def encode(texts):
        return model.encode(texts, batch_size=job["batch_size"], convert_to_numpy=True, show_progress_bar=False)

    return encode, *_device_info(device)


def trainer(job: dict):
    """step(i) -> loss: transformers + peft LoRA, the same loss, AdamW, clipping and schedule."""
    # Imported here: peft is for the train step alone, and would add to the encode runs' RSS.
    from peft import LoraConfig, get_peft_model

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft's call, deprecated
    torch.manual_seed(job["seed"])
    device = _device()
    model = _model(Path(job["torch_source"]), job["dtype"], device)
    if job["remat"] == "full":  # peft then makes the embeddings' output require grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora_cfg = job["lora"]
    # peft puts the adapters on the base layers' device, in float32 (autocast_adapter_dtype); the
    # targets are the JAX side's regular expression, which peft matches against whole module names
    model = get_peft_model(model, LoraConfig(r=lora_cfg["rank"], lora_alpha=lora_cfg["alpha"],
                                             lora_dropout=lora_cfg["dropout"], target_modules=lora_cfg["targets"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = job["optimizer"]
    optimizer = torch.optim.AdamW(params, lr=opt["lr"], weight_decay=opt["weight_decay"])
    total = job["warmup_steps"] + job["steps"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / total))
    batch = {side: (torch.tensor(job["batch"][side]["input_ids"], dtype=torch.long, device=device),
                    torch.tensor(job["batch"][side]["padding_mask"], dtype=torch.bool, device=device))
             for side in SIDES}
    labels = torch.arange(len(job["batch"]["query"]["input_ids"]), device=device)

    def step(_: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        q, pos, neg = (embed(model, *batch[side]) for side in SIDES)
        loss = torch.nn.functional.cross_entropy(q @ torch.cat([pos, neg]).T * job["scale"], labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, opt["grad_clip"])
        optimizer.step()
        schedule.step()
        return loss.item()  # waits for the step: no device work is queued after it

    device_name, info = _device_info(device)
    return step, device_name, {**info, "compile_seconds": 0.0}


def device_peak_mb() -> float | None:
    """This process's peak CUDA memory so far, in MB: what the allocator handed out (not torch's
    cache). None on the CPU, where the RSS figures cover it."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def reset_device_peak() -> bool:
    """Restart the peak-memory mark for the timed part, on CUDA."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    return False


def compilations() -> None:
    """PyTorch (eager) compiles nothing."""
    return None


def profiled(work: Callable, out_dir: str) -> dict:
    """One more pass of `work` under torch's profiler, after the timed part: a Chrome trace
    (ui.perfetto.dev) and its operators' totals."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()  # as _device: the worker ran there
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        work()  # returns plain values: the device work is done
    prof.export_chrome_trace(str(out / "trace.json"))
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=20)
    (out / "operators.txt").write_text(table + "\n")
    return {"profile_dir": str(out), "files": [str(out / "trace.json"), str(out / "operators.txt")]}
