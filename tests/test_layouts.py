"""Checkpoint layouts as users hold them, and the Qwen3 family.

A bare decoder saved by transformers (`Qwen2Model.save_pretrained`: names without `model.`, no
`lm_head`) and the LM class's layout (prefixed, with its head), in one safetensors file, in shards,
or as PyTorch .bin (one file or an index): `diffemb encode` gives the vectors that transformers'
final hidden states pooled give (float32, both attention modes, 1e-4). The layout is read from the
tensor names; a checkpoint that fits neither layout keeps the named error. A model without its
head trains and exports back as the bare class that transformers' AutoModel reads. Qwen3 (q/k
RMSNorm per head, head_dim 16 where hidden / heads is 8): parity with Qwen3Model, and an export
that AutoModelForCausalLM reads back with equal logits."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from conftest import padded_batch
from safetensors.torch import save_file

import tiny
from diffemb_jax.checkpoints import CheckpointError, export_model, load_model, model_config
from diffemb_jax.checkpoints.families import FAMILIES, hf_config
from diffemb_jax.cli import main as cli
from diffemb_jax.model import ForwardOptions, UnsupportedConfigError

TEXTS = ["the cat plays music", "a dog runs fast", "the big red car was fast and the small blue car was slow",
         "she reads", "we write one two three four five six seven"]
ATTENTIONS = ("bidirectional", "causal")


@pytest.fixture(scope="module", params=tiny.TRANSFORMERS_FAMILIES)
def oracle(request):
    return request.param, tiny.oracle_model(request.param)


def _state(lm, *, prefixed: bool, head: bool) -> dict:
    """The LM class's tensors, in the prefixed or the bare layout, with or without the head."""
    state = {k: v.contiguous() for k, v in lm.state_dict().items()}
    if not head or lm.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state if prefixed else {k.removeprefix("model."): v for k, v in state.items()}


def _write_by_hand(lm, directory, state, *, fmt: str, shards: int = 1):
    """`state` under lm's config.json, as safetensors or .bin, in `shards` files (an index if > 1)."""
    directory.mkdir(parents=True)
    lm.config.to_json_file(directory / "config.json")
    tiny.write_tokenizer(directory, bos=False)
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    names = sorted(state)
    parts = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, part in enumerate(parts):
        file = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        chunk = {n: state[n] for n in part}
        save_file(chunk, str(directory / file), metadata={"format": "pt"}) if fmt == "safetensors" \
            else torch.save(chunk, directory / file)
        weight_map |= dict.fromkeys(part, file)
    if shards > 1:
        (directory / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def _save(lm, directory, layout: str):
    """The layouts users hold; the transformers-written ones by transformers itself."""
    if layout == "bare":  # AutoModel.save_pretrained: no prefix, no head
        lm.model.save_pretrained(directory)
    elif layout == "bare_sharded":
        lm.model.save_pretrained(directory, max_shard_size="20KB")
        assert (directory / "model.safetensors.index.json").exists()
    elif layout == "prefixed_head":  # AutoModelForCausalLM.save_pretrained
        lm.save_pretrained(directory)
    elif layout == "prefixed_head_sharded_bin":
        return _write_by_hand(lm, directory, _state(lm, prefixed=True, head=True), fmt="bin", shards=3)
    elif layout == "bare_bin":
        return _write_by_hand(lm, directory, _state(lm, prefixed=False, head=False), fmt="bin")
    elif layout == "bare_sharded_bin":
        return _write_by_hand(lm, directory, _state(lm, prefixed=False, head=False), fmt="bin", shards=3)
    elif layout == "prefixed_headless":
        return _write_by_hand(lm, directory, _state(lm, prefixed=True, head=False), fmt="safetensors")
    elif layout == "bare_head":
        return _write_by_hand(lm, directory, _state(lm, prefixed=False, head=True), fmt="safetensors")
    else:
        raise ValueError(layout)
    tiny.write_tokenizer(directory, bos=False)
    return directory


def _oracle_vectors(lm, tokenizer_dir, attention):
    return tiny.oracle_mean_vectors(lm, tokenizer_dir, TEXTS, attention)


def _encode(directory, tmp_path, attention):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / f"{attention}.npy"
    assert cli(["encode", "--model", str(directory), "--input", str(texts), "--output", str(out),
                "--attention", attention, "--batch-size", "8"]) == 0
    return np.load(out)


def test_a_bare_decoder_encodes_as_transformers(oracle, tmp_path):
    """The issue's case: `XModel.save_pretrained` (no `model.`, no head), through `diffemb encode`."""
    family, lm = oracle
    directory = _save(lm, tmp_path / "bare", "bare")
    assert json.loads((directory / "config.json").read_text())["architectures"] == [tiny.BARE_CLASSES[family]]
    assert not any(k.startswith(("model.", "lm_head")) for k in _safetensors_names(directory))
    for attention in ATTENTIONS:
        np.testing.assert_allclose(_encode(directory, tmp_path, attention), _oracle_vectors(lm, directory, attention),
                                   atol=1e-4, rtol=0)


def _safetensors_names(directory):
    from diffemb_jax.checkpoints.sources import open_weights

    return open_weights(directory).names()


@pytest.mark.parametrize("family, layout", [
    ("qwen2", "prefixed_head"), ("qwen2", "bare_sharded"), ("qwen2", "bare_bin"), ("qwen2", "prefixed_headless"),
    ("qwen3", "bare_sharded_bin"), ("qwen3", "bare_head"), ("llama", "prefixed_head_sharded_bin"),
    ("mistral", "bare_bin"),
])
def test_every_layout_encodes_as_transformers(family, layout, tmp_path):
    lm = tiny.oracle_model(family)
    directory = _save(lm, tmp_path / layout, layout)
    for attention in ATTENTIONS:
        np.testing.assert_allclose(_encode(directory, tmp_path, attention), _oracle_vectors(lm, directory, attention),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("family, tied", [("qwen2", False), ("llama", True)])
def test_the_head_is_there_exactly_when_the_checkpoint_has_it(family, tied, tmp_path):
    """An untied head the checkpoint lacks is not built and logits say why; a tied head is the
    embedding matrix, so a bare tied checkpoint keeps its logits; a prefixed one with its head has them."""
    lm = tiny.oracle_model(family)
    assert lm.config.tie_word_embeddings == tied
    ids, mask = padded_batch([9, 5], 9, "right")
    bare, _ = load_model(_save(lm, tmp_path / "bare", "bare"), progress=False)
    assert model_config(tmp_path / "bare").lm_head == bare.cfg.lm_head == tied
    assert hasattr(bare, "lm_head") is False
    hidden = bare(jnp.asarray(ids), jnp.asarray(mask), ForwardOptions(attention="causal"))
    with torch.no_grad():
        want = lm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    if tied:
        np.testing.assert_allclose(np.asarray(bare.logits(hidden))[mask.astype(bool)], want[mask.astype(bool)],
                                   atol=1e-4)
    else:
        with pytest.raises(ValueError, match="no LM head.*bare decoder.*Encoding needs none"):
            bare.logits(hidden)
    full, _ = load_model(_save(lm, tmp_path / "full", "prefixed_head"), progress=False)
    assert full.cfg.lm_head
    np.testing.assert_allclose(np.asarray(full.logits(hidden))[mask.astype(bool)], want[mask.astype(bool)], atol=1e-4)


def _broken_bare(lm, directory, edit):
    state = _state(lm, prefixed=False, head=False)
    edit(state)
    return _write_by_hand(lm, directory, state, fmt="safetensors")


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("layers.1.mlp.up_proj.weight"), r"missing \(1\): layers.1.mlp.up_proj.weight"),
    (lambda s: s.update({"layers.0.mlp.extra.weight": torch.zeros(2)}), r"unexpected \(1\): layers.0.mlp.extra.weight"),
    (lambda s: s.update({"layers.0.mlp.gate_proj.weight": s["layers.0.mlp.gate_proj.weight"][:40].clone()}),
     r"wrong shape \(1\): layers.0.mlp.gate_proj.weight: checkpoint \(40, 32\), config expects \(64, 32\)"),
    (lambda s: s.update({"model." + k: s.pop(k) for k in [k for k in s if k.startswith("layers.0.")]}),
     r"missing \(\d+\): layers.0.input_layernorm.weight.*\n  unexpected \(\d+\): model.layers.0."),
])
def test_a_bare_checkpoint_that_does_not_fit_is_named(edit, message, tmp_path, capsys):
    """Named in the layout the checkpoint uses; one half prefixed, half bare fits neither."""
    src = _broken_bare(tiny.oracle_model("qwen2"), tmp_path / "broken", edit)
    with pytest.raises(CheckpointError, match="checkpoint does not match the model config:\n(.|\n)*" + message):
        load_model(src, progress=False)
    texts = tmp_path / "t.txt"
    texts.write_text("the cat\n")
    assert cli(["encode", "--model", str(src), "--input", str(texts), "--output", str(tmp_path / "o.npy")]) == 2
    assert "checkpoint does not match the model config" in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()


def test_a_family_mismatch_keeps_the_named_error(tmp_path):
    """A Qwen2Model's tensors under a llama config.json: the biases are unexpected, in bare names."""
    lm = tiny.oracle_model("qwen2")
    directory = _save(lm, tmp_path / "bare", "bare")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"model_type": "llama", "architectures": ["LlamaModel"]}))
    with pytest.raises(CheckpointError, match=r"unexpected \(6\): layers.0.self_attn.k_proj.bias"):
        load_model(directory, progress=False)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_a_headless_model_exports_as_the_bare_class(family, tmp_path):
    """A bare decoder exported is a bare decoder: AutoModel reads it to the same states, and it reads
    back here to the same model."""
    lm = tiny.oracle_model(family)
    out = export_model(_save(lm, tmp_path / "bare", "bare"), tmp_path / "out", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [tiny.BARE_CLASSES[family]] and config["model_type"] == family
    assert "AutoModel.from_pretrained" in (out / "README.md").read_text()
    assert sorted(_safetensors_names(out)) == sorted(lm.model.state_dict())
    reread = tf.AutoModel.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reread).__name__ == tiny.BARE_CLASSES[family]
    ids, mask = padded_batch([9, 5], 9, "left")
    real = mask.astype(bool)
    positions = torch.as_tensor((mask.cumsum(-1) - 1).clip(0))
    for attention in ATTENTIONS:
        theirs = reread(input_ids=torch.as_tensor(ids), position_ids=positions, attention_mask=(
            torch.as_tensor(mask).bool()[:, None, None, :].expand(-1, 1, 9, -1) if attention == "bidirectional"
            else torch.as_tensor(mask))).last_hidden_state.detach().numpy()
        np.testing.assert_allclose(theirs[real], tiny.oracle_hidden(lm, ids, mask, attention)[real], atol=1e-5)
    again, _ = load_model(out, progress=False)
    assert not again.cfg.lm_head


@pytest.mark.parametrize("family, cls", [("Dream", "DreamModel"), ("llada", "LLaDAModelLM")])
def test_dream_and_llada_without_their_head_have_no_form_to_export(family, cls):
    """Their code has one class, which has a head: a headless one is refused, not written wrong."""
    import dataclasses

    from diffemb_jax.model import ModelConfig

    cfg = ModelConfig(model_type=family, vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=64, qkv_bias=FAMILIES[family].qkv_bias)
    hf_config(cfg)  # with its head: fine
    with pytest.raises(ValueError, match=f"no LM head, and {cls}.*no Hugging Face form"):
        hf_config(dataclasses.replace(cfg, lm_head=False))


def test_a_headless_model_trains_and_exports_with_its_adapter(tmp_path):
    """LoRA training needs no head: two steps on a bare Qwen3Model, the adapter merged into a bare export."""
    from training_fixtures import train_args, write_training_data

    lm = tiny.oracle_model("qwen3")
    model = _save(lm, tmp_path / "bare", "bare")
    data = write_training_data(tmp_path / "train.jsonl", rows=16)
    assert cli(train_args(model, data, tmp_path / "run", "--config.train.steps=2")) == 0
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_config.json").exists()
    out = tmp_path / "out"
    assert cli(["export", str(model), str(out), "--adapter", str(adapter)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3Model"]
    merged = tf.AutoModel.from_pretrained(out, dtype=torch.float32)
    changed = [n for n, p in merged.state_dict().items() if not torch.equal(p, lm.model.state_dict()[n])]
    assert changed and all("proj" in n for n in changed)


# --------------------------------------------------------------------------------------------- Qwen3

def test_qwen3_reads_its_config_and_refuses_what_the_decoder_cannot_honour(tmp_path):
    lm = tiny.oracle_model("qwen3")
    config = json.loads((tiny.write_checkpoint("qwen3", tmp_path / "hf", model=lm) / "config.json").read_text())
    cfg = model_config(tmp_path / "hf")
    assert (cfg.model_type, cfg.qk_norm, cfg.qkv_bias, cfg.head_dim, cfg.rope_theta) == ("qwen3", True, False, 16, 1e6)
    assert cfg.head_dim * cfg.num_heads != cfg.hidden_size  # decoupled
    from diffemb_jax.checkpoints.families import config_from_hf

    assert config_from_hf({k: v for k, v in config.items() if k != "head_dim"}).head_dim == 128  # Qwen3Config's
    for edit, needle in [({"use_sliding_window": True}, "use_sliding_window=True"),
                         ({"attention_bias": True}, "attention_bias=True"),
                         ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding_attention"),
                         ({"mlp_bias": True}, "mlp_bias=True"),
                         ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not implemented")]:
        with pytest.raises(UnsupportedConfigError, match=needle):
            config_from_hf(config | edit)


def test_qwen3_matches_transformers_and_its_export_reads_back(tmp_path):
    """Hidden states of Qwen3Model in both modes (padded batch, left padding), and the export read by
    AutoModelForCausalLM with equal weights and logits."""
    lm = tiny.oracle_model("qwen3")
    assert any("q_norm" in n for n in lm.state_dict())
    directory = tiny.write_checkpoint("qwen3", tmp_path / "hf", model=lm)
    model, tok = load_model(directory, progress=False)
    ids, mask = padded_batch([9, 5, 2], 9, "left")
    real = mask.astype(bool)
    for attention in ATTENTIONS:
        ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), ForwardOptions(attention=attention)))
        np.testing.assert_allclose(ours[real], tiny.oracle_hidden(lm, ids, mask, attention)[real], atol=1e-4, rtol=0)
    out = export_model(directory, tmp_path / "out", progress=False)
    reread = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reread).__name__ == "Qwen3ForCausalLM" and reread.config.head_dim == 16
    for name, value in lm.state_dict().items():
        torch.testing.assert_close(reread.state_dict()[name], value, rtol=0, atol=0, msg=name)
    ids, mask = padded_batch([9, 5, 2], 9, "right")
    ours = np.asarray(model.logits(model(jnp.asarray(ids), jnp.asarray(mask), ForwardOptions(attention="causal"))))
    with torch.no_grad():
        theirs = reread(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    np.testing.assert_allclose(ours[mask.astype(bool)], theirs[mask.astype(bool)], atol=1e-4)


# ------------------------------------------------------------------------------------------ Hub ids

def test_a_hub_id_resolves_through_the_local_cache_and_offline_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    """`--model ORG/NAME`: the snapshot in the Hugging Face cache (the layout huggingface_hub writes:
    models--ORG--NAME/refs/main, snapshots/<commit>/), nothing downloaded; absent, an error naming the
    command that downloads it. A path that exists is taken as a path."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny-org--tiny-qwen3"
    lm = tiny.oracle_model("qwen3")
    _save(lm, repo / "snapshots" / commit, "bare")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.chdir(tmp_path)
    np.testing.assert_allclose(_encode("tiny-org/tiny-qwen3", tmp_path, "causal"),
                               _oracle_vectors(lm, repo / "snapshots" / commit, "causal"), atol=1e-4)
    assert model_config("tiny-org/tiny-qwen3").model_type == "qwen3"
    texts = tmp_path / "texts.txt"
    assert cli(["encode", "--model", "tiny-org/absent", "--input", str(texts), "--output", "o.npy"]) == 2
    err = capsys.readouterr().err
    assert "tiny-org/absent is neither a local path nor a model in the Hugging Face cache" in err
    assert "hf download tiny-org/absent" in err
    (tmp_path / "tiny-org" / "tiny-qwen3").mkdir(parents=True)  # a folder of that name wins, and is no model
    with pytest.raises(CheckpointError, match="has no config.json"):
        model_config("tiny-org/tiny-qwen3")
