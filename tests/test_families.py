"""The family records (checkpoints/families.py): what a config.json may say and what an export writes.

Oracles: transformers' own config classes (the current version reads rope_parameters) and the plain
fields that transformers 4.x config classes read (rope_theta), which llm2vec and Dream's own code
need; LLaDA's fields as its published configuration class names them."""

from __future__ import annotations

import json

import pytest
import transformers

import tiny
from diffemb_jax.checkpoints import export_model
from diffemb_jax.checkpoints.families import FAMILIES, config_from_hf, family_of
from diffemb_jax.model import UnsupportedConfigError

THETA = {"qwen2": 1e6, "qwen3": 1e6, "Dream": 1e6, "llama": 5e5, "llada": 5e5, "mistral": 1e4}  # tests/tiny.py's


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_an_export_states_rope_theta_for_transformers_4_and_5(family, tmp_path):
    src = tiny.write_checkpoint(family, tmp_path / "hf")
    out = export_model(src, tmp_path / "out", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == THETA[family]  # what transformers 4.x reads
    assert config.get("rope_scaling") is None
    assert config_from_hf(config).rope_theta == THETA[family]
    if family in tiny.TRANSFORMERS_FAMILIES:  # the current transformers reads the same theta
        assert transformers.AutoConfig.from_pretrained(out).rope_parameters["rope_theta"] == THETA[family]


@pytest.mark.parametrize("field,value", [
    ("alibi", True), ("rope", False), ("attention_layer_norm", True), ("input_emb_norm", True),
    ("scale_logits", True), ("layer_norm_with_affine", False), ("bias_for_layer_norm", True),
    ("multi_query_attention", True), ("include_bias", True), ("block_type", "sequential"),
])
def test_llada_fields_the_decoder_cannot_honour_are_refused(field, value, tmp_path):
    config = json.loads((tiny.write_checkpoint("llada", tmp_path / "hf") / "config.json").read_text())
    config_from_hf(config)  # as written: accepted
    with pytest.raises(UnsupportedConfigError, match=rf"config field {field}="):
        config_from_hf({**config, field: value})


def test_the_families_records():
    assert set(FAMILIES) == set(tiny.FAMILIES)
    assert family_of("dream") is FAMILIES["Dream"] and family_of("LLaDA") is FAMILIES["llada"]
    with pytest.raises(UnsupportedConfigError, match="unsupported model_type 'gpt2'"):
        family_of("gpt2")
    headless = {name for name, family in FAMILIES.items() if family.headless}
    assert headless == {"qwen2", "qwen3", "llama", "mistral"}  # Dream's and LLaDA's AutoModel is their LM class


@pytest.mark.parametrize("family", ["Dream", "llada"])
def test_a_remote_code_export_keeps_auto_map_and_says_which_files_to_place(family, tmp_path):
    src = tiny.write_checkpoint(family, tmp_path / "hf")
    source_map = json.loads((src / "config.json").read_text()).get("auto_map")
    out = export_model(src, tmp_path / "out", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == (source_map or FAMILIES[family].auto_map)  # tiny Dream has its own, LLaDA none
    readme = (out / "README.md").read_text()
    for name in FAMILIES[family].code_files + (FAMILIES[family].code_repo, "trust_remote_code=True"):
        assert name in readme
    converted = export_model(out, tmp_path / "again", progress=False)  # a re-export of the export keeps it too
    assert json.loads((converted / "config.json").read_text())["auto_map"] == config["auto_map"]


def test_a_transformers_export_names_no_remote_code(tmp_path):
    out = export_model(tiny.write_checkpoint("qwen2", tmp_path / "hf"), tmp_path / "out", progress=False)
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert "AutoModelForCausalLM.from_pretrained" in (out / "README.md").read_text()
