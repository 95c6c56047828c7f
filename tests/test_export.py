"""The way out: decoders back to Hugging Face directories, LoRA adapters to and from PEFT.

Oracles: transformers (float32) reloading what we write, checked against the tiny model we started
from (weights exactly, hidden states within 1e-5); peft loading our adapters and making its own
(embeddings within 1e-4, merged weights within 1e-6). Dream and LLaDA load into transformers' Qwen2
and LLaMA the way tests/tiny.py writes them."""

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers as tf
from conftest import padded_batch
from flax import nnx
from safetensors.numpy import load_file, save_file

import tiny
from diffemb_jax.checkpoints import CheckpointError, convert, load_model
from diffemb_jax.checkpoints.export import export_hf
from diffemb_jax.checkpoints.peft_adapters import load_peft_adapter, merged_from_peft, save_peft_adapter
from diffemb_jax.cli import main as cli
from diffemb_jax.embedding.pooling import pool
from diffemb_jax.model.attention import attend
from diffemb_jax.model.lora import LoraConfig, apply_lora, merge_lora

LENGTHS = [9, 5, 2]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def family_dir(request, tmp_path_factory):
    family = request.param
    oracle = tiny.oracle_model(family)
    return family, oracle, tiny.write_checkpoint(family, tmp_path_factory.mktemp(family) / "hf", model=oracle)


def _weights(directory) -> dict[str, np.ndarray]:
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    out = {}
    for f in files:
        out |= load_file(str(directory / f))
    return out


def _reload_in_transformers(family: str, directory):
    """The exported directory as a transformers model: AutoModel for the transformers families; Qwen2 /
    LLaMA configs and renamed tensors for Dream / LLaDA (whose own code we never run)."""
    config = json.loads((directory / "config.json").read_text())
    if family in tiny.TRANSFORMERS_FAMILIES:
        return tf.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    state = {k: torch.from_numpy(v) for k, v in _weights(directory).items()}
    if family == "Dream":
        assert config["model_type"] == "Dream" and config["architectures"] == ["DreamModel"]
        hf = tf.Qwen2Config(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
        model = tf.Qwen2ForCausalLM(hf)
    else:
        llama_names = {tiny._llada_name(k): k for k in tiny.oracle_model("llada").state_dict()}
        state = {llama_names[k]: v for k, v in state.items()}
        hf = tf.LlamaConfig(vocab_size=config["embedding_size"], hidden_size=config["d_model"],
                            intermediate_size=config["mlp_hidden_size"], num_hidden_layers=config["n_layers"],
                            num_attention_heads=config["n_heads"], num_key_value_heads=config["n_kv_heads"],
                            rms_norm_eps=config["rms_norm_eps"], rope_theta=config["rope_theta"],
                            max_position_embeddings=config["max_sequence_length"],
                            tie_word_embeddings=config["weight_tying"])
        model = tf.LlamaForCausalLM(hf)
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_round_trip_through_transformers(family_dir, tmp_path):
    family, oracle, hf_dir = family_dir
    model, tok = load_model(hf_dir, progress=False)
    out = export_hf(model, tok, tmp_path / "export", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    written, original = _weights(out), _weights(hf_dir)  # same names, same bits as the source checkpoint
    assert sorted(written) == sorted(original)
    for name, value in original.items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)
    reloaded = _reload_in_transformers(family, out)
    ours, theirs = reloaded.state_dict(), oracle.state_dict()
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=0, msg=name)
    ids, mask = padded_batch(LENGTHS, 9, "right")
    real = mask.astype(bool)
    for attention in ("bidirectional", "causal"):
        np.testing.assert_allclose(tiny.oracle_hidden(reloaded, ids, mask, attention)[real],
                                   tiny.oracle_hidden(oracle, ids, mask, attention)[real], atol=1e-5, rtol=0)
    assert tok.encode("the cat plays").ids == tf.PreTrainedTokenizerFast(
        tokenizer_file=str(out / "tokenizer.json")).encode("the cat plays")


def test_config_fields_read_back(family_dir, tmp_path):
    family, oracle, hf_dir = family_dir
    model, tok = load_model(hf_dir, progress=False)
    config = json.loads((export_hf(model, tok, tmp_path / "export", progress=False) / "config.json").read_text())
    hf = oracle.config
    if family == "llada":
        got = {k: config[k] for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size",
                                      "vocab_size", "embedding_size", "rms_norm_eps", "rope_theta", "mask_token_id",
                                      "weight_tying", "include_bias", "include_qkv_bias", "block_type",
                                      "activation_type", "layer_norm_type", "max_sequence_length")}
        want = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "mlp_hidden_size": 64, "vocab_size": 97,
                "embedding_size": 97, "rms_norm_eps": 1e-6, "rope_theta": 5e5, "mask_token_id": 96,
                "weight_tying": False, "include_bias": False, "include_qkv_bias": False, "block_type": "llama",
                "activation_type": "silu", "layer_norm_type": "rms", "max_sequence_length": 256}
        assert got == want and config["architectures"] == ["LLaDAModelLM"]
        return
    reread = tf.Qwen2Config(**config) if family == "Dream" else tf.AutoConfig.from_pretrained(tmp_path / "export")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings",
                  "rope_parameters"):
        assert getattr(reread, field) == getattr(hf, field), field
    assert reread.head_dim == (16 if family == "qwen3" else 8)
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "Dream": "DreamModel",
            "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[family]
    assert config["architectures"] == [arch] and config["model_type"] == family
    if family == "Dream":
        assert config["mask_token_id"] == 96 and config["rope_theta"] == 1e6


def test_mistral_sliding_window_survives(tmp_path):
    oracle = tiny.oracle_model("mistral", sliding_window=3)
    model, tok = load_model(tiny.write_checkpoint("mistral", tmp_path / "hf", model=oracle), progress=False)
    out = export_hf(model, tok, tmp_path / "export", progress=False)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.sliding_window == 3
    ids, mask = padded_batch([9, 7], 9, "right")
    np.testing.assert_allclose(tiny.oracle_hidden(reloaded, ids, mask, "causal"),
                               tiny.oracle_hidden(oracle, ids, mask, "causal"), atol=1e-5)


def test_sharded_and_bfloat16(tmp_path):
    oracle = tiny.oracle_model("qwen2")
    model, tok = load_model(tiny.write_checkpoint("qwen2", tmp_path / "hf", model=oracle), progress=False)
    out = export_hf(model, tok, tmp_path / "export", dtype="bfloat16", max_shard_bytes=20_000, progress=False)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(oracle.state_dict())
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    want = oracle.to(torch.bfloat16).state_dict()  # torch rounds to nearest even, as ml_dtypes does
    for name, value in reloaded.state_dict().items():
        assert value.dtype == torch.bfloat16
        torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=name)


def test_refuses_existing_or_missing_parent_and_adapted_models(tmp_path):
    model, tok = load_model(tiny.write_checkpoint("qwen2", tmp_path / "hf"), progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        export_hf(model, tok, tmp_path / "exists")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_hf(model, tok, tmp_path / "nowhere" / "out")
    adapted = apply_lora(model, LoraConfig(rank=2, alpha=4, dropout=0.0))
    with pytest.raises(ValueError, match="merge them first"):
        export_hf(adapted, tok, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "hf"]  # nothing half-written


# ------------------------------------------------------------------------------------------ LoRA out

def _randomise_lora(model, seed=0):
    """Random A and B (B starts at zero, so an untrained adapter would prove nothing)."""
    state = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))


def _our_embeddings(model, ids, mask):
    hidden = model(jnp.asarray(ids), jnp.asarray(mask))
    return np.asarray(pool(hidden, jnp.asarray(mask), jnp.asarray(mask), "mean"))


def _torch_mean(hidden, mask):
    m = mask[..., None].astype(np.float32)
    return (hidden * m).sum(1) / m.sum(1)


@pytest.mark.parametrize("headless", [False, True])
def test_adapter_out_loads_in_peft(tmp_path, headless):
    """Ours: apply_lora + random adapters (dropout 0). Oracle: peft with our adapter on transformers'
    Qwen2ForCausalLM, or on the bare Qwen2Model for a headless adapter; bidirectional mean pooling."""
    hf_dir = tiny.write_checkpoint("qwen2", tmp_path / "hf")
    model, _ = load_model(hf_dir, progress=False)
    lora = LoraConfig(rank=4, alpha=8, dropout=0.0)
    adapted = apply_lora(model, lora)
    _randomise_lora(adapted)
    out = save_peft_adapter(adapted, lora, tmp_path / "adapter", base_model_name_or_path=str(hf_dir),
                            headless=headless)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(ALL_LINEAR)
    base = tiny.oracle_model("qwen2")
    peft_model = peft.PeftModel.from_pretrained(base.model if headless else base, out).eval()
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 14 and all(p.abs().sum() > 0 for p in lora_b)  # every tensor found its module
    ids, mask = padded_batch(LENGTHS, 9, "right")
    inner = peft_model.base_model.model
    theirs = _torch_mean(tiny.oracle_hidden(SimpleNamespace(model=inner) if headless else inner,
                                            ids, mask, "bidirectional"), mask)
    np.testing.assert_allclose(_our_embeddings(adapted, ids, mask), theirs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(_our_embeddings(merge_lora(adapted, lora), ids, mask), theirs, atol=1e-4, rtol=0)


def test_adapted_bf16_model_stays_bf16_like_peft(tmp_path, monkeypatch):
    """peft casts an adapted bf16 layer's output back to bf16 (its float32 adapters' delta would promote
    it); so must we, or every adapted projection turns attention (then no cuDNN), the residual stream
    and the MLP float32. Oracle: peft with our adapter on transformers' model in bf16."""
    from diffemb_jax.model import decoder

    hf_dir = tiny.write_checkpoint("qwen2", tmp_path / "hf")
    model, _ = load_model(hf_dir, dtype="bfloat16", progress=False)
    lora = LoraConfig(rank=4, alpha=8, dropout=0.0)
    adapted = apply_lora(model, lora)
    _randomise_lora(adapted)
    out = save_peft_adapter(adapted, lora, tmp_path / "adapter", base_model_name_or_path=str(hf_dir))
    peft_model = peft.PeftModel.from_pretrained(tiny.oracle_model("qwen2").to(torch.bfloat16), out).eval()
    assert {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n} == {torch.float32}
    ids, mask = padded_batch(LENGTHS, 9, "right")
    pad = torch.as_tensor(mask).bool()
    with torch.no_grad():
        theirs = peft_model.base_model.model.model(
            input_ids=torch.as_tensor(ids), attention_mask=pad[:, None, None, :].expand(-1, 1, 9, -1),
            position_ids=(pad.long().cumsum(-1) - 1).clamp(min=0)).last_hidden_state
    attended = []
    monkeypatch.setattr(decoder, "attend", lambda q, k, v, *a, **kw: attended.append(q.dtype) or attend(q, k, v, *a, **kw))
    ours = adapted(jnp.asarray(ids), jnp.asarray(mask))
    assert theirs.dtype == torch.bfloat16 and ours.dtype == jnp.bfloat16 and set(attended) == {jnp.dtype(jnp.bfloat16)}
    real = np.asarray(mask, bool)
    theirs, ours = theirs.float().numpy()[real], np.asarray(ours.astype(jnp.float32))[real]
    np.testing.assert_allclose(ours, theirs, atol=0.03 * np.abs(theirs).max(), rtol=0)


def _torch_tree(state: dict[str, np.ndarray]) -> torch.nn.Module:
    """A torch module whose parameters carry `state`'s names, each 2-D `.weight` in an nn.Linear: enough
    for peft to adapt and merge any family's names (LLaDA's code included) without its modelling code."""
    root = torch.nn.Module()
    linear_first = sorted(state.items(), key=lambda kv: not (kv[0].endswith(".weight") and kv[1].ndim == 2))
    for name, value in linear_first:
        *parents, leaf = name.split(".")
        node = root
        for i, part in enumerate(parents):
            if not hasattr(node, part):
                last = i == len(parents) - 1
                child = torch.nn.Linear(value.shape[1], value.shape[0], bias=False) \
                    if last and leaf == "weight" and value.ndim == 2 else torch.nn.Module()
                node.add_module(part, child)
            node = getattr(node, part)
        if isinstance(node, torch.nn.Linear) and leaf in ("weight", "bias"):
            setattr(node, leaf, torch.nn.Parameter(torch.from_numpy(value.copy())))
        else:
            node.register_parameter(leaf, torch.nn.Parameter(torch.from_numpy(value.copy())))
    return root


@pytest.mark.parametrize("layers", [None, [1]])
def test_adapter_out_merges_like_peft_every_family(family_dir, tmp_path, layers):
    """Oracle: peft's merge_and_unload of our adapter onto the exported base weights (each family's own
    names). `layers=[1]`: adapters on one layer only, so target_modules must be a regex of full names."""
    family, _, hf_dir = family_dir
    model, tok = load_model(hf_dir, progress=False)
    targets = r"layers/1/.*(q_proj|o_proj|down_proj)" if layers else LoraConfig().targets
    lora = LoraConfig(rank=3, alpha=5, dropout=0.0, targets=targets)
    adapted = apply_lora(model, lora)
    _randomise_lora(adapted, seed=1)
    adapter = save_peft_adapter(adapted, lora, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str if (layers or family == "llada") else list)
    merged_ours = _weights(export_hf(merge_lora(adapted, lora), tok, tmp_path / "merged", progress=False))
    tree = _torch_tree(_weights(hf_dir))
    merged_peft = peft.PeftModel.from_pretrained(tree, adapter).merge_and_unload().state_dict()
    assert sorted(merged_peft) == sorted(merged_ours)
    changed = 0
    for name, value in merged_peft.items():
        np.testing.assert_allclose(merged_ours[name], value.numpy(), atol=1e-6, rtol=0, err_msg=name)
        changed += not np.array_equal(merged_ours[name], _weights(hf_dir)[name])
    assert changed == (3 if layers else 14)


# ------------------------------------------------------------------------------------------- LoRA in

def _peft_adapter(oracle, directory, **lora_kw):
    """An adapter made by peft in PyTorch, with random lora_B; returns the peft model (eval mode)."""
    peft_model = peft.get_peft_model(oracle, peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
                                                               "target_modules": ALL_LINEAR, **lora_kw}))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(directory)
    return peft_model.eval()


def test_adapter_in_from_peft(tmp_path):
    oracle = tiny.oracle_model("qwen2")
    hf_dir = tiny.write_checkpoint("qwen2", tmp_path / "hf", model=oracle)
    peft_model = _peft_adapter(tiny.oracle_model("qwen2"), tmp_path / "adapter")
    model, _ = load_model(hf_dir, progress=False)
    adapted, lora = load_peft_adapter(model, tmp_path / "adapter")
    assert (lora.rank, lora.alpha, lora.dropout) == (4, 8.0, 0.1)
    ids, mask = padded_batch(LENGTHS, 9, "right")
    theirs = _torch_mean(tiny.oracle_hidden(peft_model.base_model.model, ids, mask, "bidirectional"), mask)
    np.testing.assert_allclose(_our_embeddings(merge_lora(adapted, lora), ids, mask), theirs, atol=1e-4, rtol=0)


def test_adapter_in_headless_one_layer_rslora(tmp_path):
    """peft on the bare LlamaModel (names without 'model.'), regex targets on one layer, rsLoRA scaling,
    tied embeddings."""
    oracle = tiny.oracle_model("llama")
    hf_dir = tiny.write_checkpoint("llama", tmp_path / "hf", model=oracle)
    peft_model = _peft_adapter(tiny.oracle_model("llama").model, tmp_path / "adapter", use_rslora=True, r=2,
                               lora_alpha=3, target_modules=r"layers\.1\.(self_attn\.q_proj|mlp\.down_proj)")
    model, _ = load_model(hf_dir, progress=False)
    merged = merged_from_peft(model, tmp_path / "adapter")
    ids, mask = padded_batch(LENGTHS, 9, "right")
    theirs = _torch_mean(tiny.oracle_hidden(SimpleNamespace(model=peft_model.base_model.model), ids, mask,
                                            "bidirectional"), mask)
    np.testing.assert_allclose(_our_embeddings(merged, ids, mask), theirs, atol=1e-4, rtol=0)
    untouched = oracle.model.layers[0].self_attn.q_proj.weight.detach().numpy().T  # layer 0 has no adapter
    assert np.array_equal(merged.layers[0].attn.q_proj.kernel[...], untouched)


def test_merge_is_kernel_by_kernel_and_equals_peft(tmp_path, monkeypatch):
    """merged_from_peft replaces the model's kernels one at a time: when each is merged, every kernel
    merged before it is already freed (so the host never holds a second model); the result is peft's
    merge_and_unload within 1e-6 (oracle: peft on Qwen2ForCausalLM, all seven projections)."""
    import gc
    import weakref

    from diffemb_jax.checkpoints import peft_adapters

    hf_dir = tiny.write_checkpoint("qwen2", tmp_path / "hf")
    peft_model = _peft_adapter(tiny.oracle_model("qwen2"), tmp_path / "adapter")
    model, tok = load_model(hf_dir, progress=False)
    old = []  # weak references to the kernels merged so far
    alive_at_each_merge, donated = [], []
    merge_one = peft_adapters._merged_kernel

    def counting(kernel, *args):
        gc.collect()
        alive_at_each_merge.append(sum(ref() is not None for ref in old))
        old.append(weakref.ref(kernel))
        merged = merge_one(kernel, *args)
        donated.append(kernel.is_deleted())  # its buffer now holds the merged kernel
        return merged

    monkeypatch.setattr(peft_adapters, "_merged_kernel", counting)
    merged = merged_from_peft(model, tmp_path / "adapter")
    assert merged is model and len(alive_at_each_merge) == 14
    assert alive_at_each_merge == [0] * 14 and all(donated)  # each old kernel gone before the next merge
    want = peft_model.merge_and_unload().state_dict()
    got = _weights(export_hf(merged, tok, tmp_path / "merged", progress=False))
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value.numpy(), atol=1e-6, rtol=0, err_msg=name)


def _edited_adapter(src, dst, edit_config=None, edit_state=None):
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    state = load_file(str(src / "adapter_model.safetensors"))
    if edit_config:
        edit_config(config)
    if edit_state:
        edit_state(state)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    save_file(state, str(dst / "adapter_model.safetensors"))
    return dst


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit_config, edit_state, needle", [
    (lambda c: c.update(peft_type="IA3"), None, "peft_type 'IA3' is not supported"),
    (lambda c: c.update(use_dora=True), None, "use_dora=True"),
    (lambda c: c.update(target_modules=["q_proj", "foo_proj"]), None, "does not have.*foo_proj"),
    (lambda c: c.update(target_modules=["embed_tokens"]), None, "does not have.*embed_tokens"),
    (None, lambda s: s.update({Q0 + ".lora_A.weight": s[Q0 + ".lora_A.weight"][:, :20].copy()}),
     r"wrong shape.*q_proj.lora_A.weight: adapter \(4, 20\), expected \(4, 32\)"),
    (lambda c: c.update(r=8), None, r"wrong shape \(28\)"),
    (None, lambda s: s.update({"base_model.model.model.layers.0.mlp.foo.lora_A.weight": np.zeros((4, 32), np.float32)}),
     "mlp.foo.lora_A.weight"),
    (None, lambda s: s.pop(Q0 + ".lora_B.weight"), "only one of lora_A / lora_B: model.layers.0.self_attn.q_proj"),
])
def test_bad_adapters(tmp_path, edit_config, edit_state, needle):
    hf_dir = tiny.write_checkpoint("qwen2", tmp_path / "hf")
    _peft_adapter(tiny.oracle_model("qwen2"), tmp_path / "adapter")
    bad = _edited_adapter(tmp_path / "adapter", tmp_path / "bad", edit_config, edit_state)
    model, _ = load_model(hf_dir, progress=False)
    with pytest.raises(CheckpointError, match=needle) as e:
        load_peft_adapter(model, bad)
    assert str(bad) in str(e.value)


def test_missing_adapter_files(tmp_path):
    model, _ = load_model(tiny.write_checkpoint("qwen2", tmp_path / "hf"), progress=False)
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_peft_adapter(model, tmp_path / "hf")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_peft_adapter(model, tmp_path / "missing")


# ----------------------------------------------------------------------------------------------- CLI

def test_cli_export_converted_and_with_adapter(tmp_path, capsys):
    """`diffemb export` from a converted directory, and from an HF directory with a peft adapter merged
    in. Oracle: the original weights, and peft's merge_and_unload on Qwen2ForCausalLM."""
    oracle = tiny.oracle_model("qwen2")
    hf_dir = tiny.write_checkpoint("qwen2", tmp_path / "hf", model=oracle)
    converted = convert(hf_dir, tmp_path / "converted", progress=False)
    assert cli(["export", str(converted), str(tmp_path / "plain")]) == 0
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").state_dict()
    for name, value in oracle.state_dict().items():
        torch.testing.assert_close(reloaded[name], value, rtol=0, atol=0)

    peft_model = _peft_adapter(tiny.oracle_model("qwen2"), tmp_path / "adapter")
    assert cli(["export", str(hf_dir), str(tmp_path / "merged"), "--adapter", str(tmp_path / "adapter")]) == 0
    assert "merged" in capsys.readouterr().out
    want = peft_model.merge_and_unload().state_dict()
    got = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)


def test_cli_export_bad_inputs(tmp_path, capsys):
    hf_dir = tiny.write_checkpoint("qwen2", tmp_path / "hf")
    _peft_adapter(tiny.oracle_model("qwen2"), tmp_path / "adapter")
    bad = _edited_adapter(tmp_path / "adapter", tmp_path / "bad", lambda c: c.update(target_modules=["foo_proj"]))
    (tmp_path / "exists").mkdir()
    cases = [([str(hf_dir), str(tmp_path / "exists")], "already exists"),
             ([str(hf_dir), str(tmp_path / "nowhere" / "out")], "does not exist"),
             ([str(tmp_path / "no-model"), str(tmp_path / "out")], "does not exist"),
             ([str(hf_dir), str(tmp_path / "out"), "--adapter", str(bad)], "foo_proj")]
    for argv, needle in cases:
        assert cli(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "bad", "exists", "hf"]  # nothing half-written


def test_trained_adapter_loads_in_peft(tmp_path, capsys):
    """A LoRA trained here for a few steps (`diffemb train`) -> WORKDIR/adapter -> peft + transformers.
    Oracle: peft's PeftModel on transformers' Qwen2ForCausalLM; bidirectional mean pooling within 1e-4
    of ours, which loads the same adapter through `Embedder.from_pretrained(..., adapter=)`'s path."""
    from training_fixtures import train_args, write_training_data

    oracle = tiny.oracle_model("qwen2")
    hf_dir = tiny.write_checkpoint("qwen2", tmp_path / "hf", model=oracle)
    data = write_training_data(tmp_path / "train.jsonl")
    workdir = tmp_path / "run"
    assert cli(train_args(hf_dir, data, workdir, "--config.train.steps=4")) == 0
    adapter = workdir / "adapter"
    assert f"PEFT adapter: {adapter}" in capsys.readouterr().out
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(hf_dir) and config["r"] == 4

    peft_model = peft.PeftModel.from_pretrained(oracle, adapter).eval()
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 14 and all(p.abs().sum() > 0 for p in lora_b)  # trained, and every tensor placed
    ids, mask = padded_batch(LENGTHS, 9, "right")
    theirs = _torch_mean(tiny.oracle_hidden(peft_model.base_model.model, ids, mask, "bidirectional"), mask)
    base = _torch_mean(tiny.oracle_hidden(tiny.oracle_model("qwen2"), ids, mask, "bidirectional"), mask)
    assert np.abs(theirs - base).max() > 1e-3  # the adapter changes the embeddings
    model, _ = load_model(hf_dir, progress=False)
    np.testing.assert_allclose(_our_embeddings(merged_from_peft(model, adapter), ids, mask), theirs,
                               atol=1e-4, rtol=0)

    # Rerunning the finished run trains nothing and keeps the adapter.
    before = (adapter / "adapter_model.safetensors").read_bytes()
    assert cli(train_args(hf_dir, data, workdir, "--config.train.steps=4")) == 0
    assert (adapter / "adapter_model.safetensors").read_bytes() == before
