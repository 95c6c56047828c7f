"""sentence-transformers folders in and out.

Oracle: sentence-transformers itself (PyTorch, float32). Folders are built with its own classes
(models.Transformer + models.Pooling [+ Normalize]) over a tiny random LLaMA and saved with
`save()`; `diffemb encode` / Embedder.from_pretrained on the folder must give the vectors
`SentenceTransformer(folder).encode` gives (L2-normalised: this project's always are), within 1e-4.
Our exports must load in SentenceTransformer and encode as our Embedder does. The folder's parts
this project cannot reproduce must be refused, naming the file and field."""

import json
import shutil

import numpy as np
import pytest
import transformers as tf
from sentence_transformers import SentenceTransformer, models

import tiny
from diffemb_jax.checkpoints import CheckpointError
from diffemb_jax.cli import main as cli
from diffemb_jax.embedding import Embedder

TEXTS = ["the cat plays guitar", "a dog", "one two three four five six seven the a an is are was of to in on at",
         "the woman reads a big red text", "music"]
PROMPT = "the query is "
MAX_LENGTH = 16  # the third text, with the prompt, is longer: both sides cut it


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny LLaMA-architecture decoder as transformers writes it, with a tokenizer transformers loads
    as tokenizer.json says (<s> in front, </s> to pad)."""
    directory = tiny.write_checkpoint("llama", tmp_path_factory.mktemp("st") / "base")
    tf.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
                               pad_token="</s>", unk_token="<unk>").save_pretrained(directory)
    return directory


def _st_folder(base, out, *, pooling_mode="mean", include_prompt=True, normalize=True, more=()):
    transformer = models.Transformer(str(base), max_seq_length=MAX_LENGTH)
    pooling = models.Pooling(32, pooling_mode=pooling_mode, include_prompt=include_prompt)
    chain = [transformer, pooling, *more] + ([models.Normalize()] if normalize else [])
    SentenceTransformer(modules=chain, prompts={"query": PROMPT, "document": ""},
                        default_prompt_name="query", device="cpu").save(str(out))
    return out


def _st_vectors(folder, texts=TEXTS, **kwargs):
    model = SentenceTransformer(str(folder), device="cpu")
    return model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, **kwargs).astype(np.float32)


@pytest.mark.parametrize("pooling_mode,include_prompt,normalize", [("mean", False, True), ("lasttoken", True, False),
                                                                   ("mean", True, True), ("weightedmean", True, True)])
def test_encode_equals_sentence_transformers(base, tmp_path, pooling_mode, include_prompt, normalize):
    folder = _st_folder(base, tmp_path / "st", pooling_mode=pooling_mode, include_prompt=include_prompt,
                        normalize=normalize)
    want = _st_vectors(folder)  # the default prompt, "query", on every text
    embedder = Embedder.from_pretrained(folder)
    assert embedder.options.attention == "causal" and embedder.max_length == MAX_LENGTH
    assert embedder.skip_instruction == (not include_prompt) and embedder.prompt == PROMPT
    np.testing.assert_allclose(embedder.encode(TEXTS, progress=False), want, atol=1e-4)
    # another of the folder's prompts, by name, and the CLI on the same folder
    documents = _st_vectors(folder, prompt_name="document")
    np.testing.assert_allclose(Embedder.from_pretrained(folder, prompt_name="document").encode(TEXTS, progress=False),
                               documents, atol=1e-4)
    assert not np.allclose(documents, want, atol=1e-3)  # the prompt mattered


def test_cli_encode_and_export_with_the_transformer_in_a_subfolder(base, tmp_path):
    """Older sentence-transformers versions keep the Transformer in 0_Transformer/: modules.json says where."""
    folder = _st_folder(base, tmp_path / "st", include_prompt=False)
    sub = folder / "0_Transformer"
    sub.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "sentence_bert_config.json"):
        shutil.move(folder / name, sub / name)
    modules = json.loads((folder / "modules.json").read_text())
    modules[0]["path"] = "0_Transformer"
    (folder / "modules.json").write_text(json.dumps(modules))
    want = _st_vectors(folder)
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "vectors.npy"
    assert cli(["encode", "--model", str(folder), "--input", str(tmp_path / "texts.txt"), "--output", str(out)]) == 0
    np.testing.assert_allclose(np.load(out), want, atol=1e-4)
    # exported again: the folder's pooling, include_prompt, length and prompts are the export's defaults
    again = tmp_path / "again"
    assert cli(["export", str(folder), str(again), "--format", "sentence-transformers", "--attention", "causal"]) == 0
    np.testing.assert_allclose(_st_vectors(again), want, atol=1e-4)


@pytest.mark.parametrize("pooling,skip", [("mean", True), ("last_token", False)])
def test_export_loads_in_sentence_transformers(base, tmp_path, pooling, skip):
    out = tmp_path / "exported"
    args = ["export", str(base), str(out), "--format", "sentence-transformers", "--attention", "causal",
            "--pooling", pooling, "--max-length", str(MAX_LENGTH), "--prompt", f"query={PROMPT}",
            "--prompt", "document=", "--default-prompt", "query"] + (["--skip-instruction"] if skip else [])
    assert cli(args) == 0
    ours = Embedder.from_pretrained(base, attention="causal", pooling=pooling, skip_instruction=skip,
                                    max_length=MAX_LENGTH, prompt=PROMPT).encode(TEXTS, progress=False)
    model = SentenceTransformer(str(out), device="cpu")
    theirs = model.encode(TEXTS, convert_to_numpy=True)  # the folder's Normalize: unit vectors already
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    assert model.max_seq_length == MAX_LENGTH and model.default_prompt_name == "query"
    # the export read back here gives the same settings and vectors
    np.testing.assert_allclose(Embedder.from_pretrained(out).encode(TEXTS, progress=False), ours, atol=1e-5)
    assert "causal" in (out / "README.md").read_text()


def test_export_refuses_bidirectional_attention(base, tmp_path, capsys):
    out = tmp_path / "exported"
    assert cli(["export", str(base), str(out), "--format", "sentence-transformers"]) == 2
    err = capsys.readouterr().err
    assert "causal attention only" in err and "--attention causal" in err
    assert not out.exists()


def _edit(path, **fields):
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


BAD = {
    "dense": ("modules.json", "Dense"),
    "cls": ("1_Pooling/config.json", "pooling_mode 'cls'"),
    "max": ("1_Pooling/config.json", "pooling_mode 'max'"),
    "chat_template": ("sentence_bert_config.json", "modality_config"),
    "lower_case": ("sentence_bert_config.json", "do_lower_case"),
    "default_prompt": ("config_sentence_transformers.json", "default_prompt_name 'passage'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_unsupported_folders_are_refused(base, tmp_path, case):
    folder = tmp_path / "st"
    if case == "dense":
        _st_folder(base, folder, more=[models.Dense(32, 8)])
    else:
        _st_folder(base, folder, pooling_mode=case if case in ("cls", "max") else "mean")
    if case == "chat_template":
        _edit(folder / "sentence_bert_config.json", modality_config={
            "text": {"method": "forward", "method_output_name": "last_hidden_state"},
            "message": {"method": "forward", "method_output_name": "last_hidden_state", "format": "structured"}})
    elif case == "lower_case":
        _edit(folder / "sentence_bert_config.json", do_lower_case=True)
    elif case == "default_prompt":
        _edit(folder / "config_sentence_transformers.json", default_prompt_name="passage")
    file, field = BAD[case]
    with pytest.raises(CheckpointError) as error:
        Embedder.from_pretrained(folder)
    assert str(folder / file) in str(error.value) and field in str(error.value)


def test_unknown_prompt_name(base, tmp_path):
    folder = _st_folder(base, tmp_path / "st")
    with pytest.raises(CheckpointError, match="no prompt named 'passage' \(it has 'document', 'query'\)"):
        Embedder.from_pretrained(folder, prompt_name="passage")
    with pytest.raises(ValueError, match="not a sentence-transformers folder"):
        Embedder.from_pretrained(base, prompt_name="query")


def test_served_inputs_get_the_folder_prompt(base, tmp_path):
    """diffemb serve tokenises each request itself: with a folder's prompt its rows (cut by truncate
    too) encode as SentenceTransformer does."""
    from diffemb_jax.serve.schemas import EmbedRequest
    from diffemb_jax.serve.tokens import request_tokens

    folder = _st_folder(base, tmp_path / "st", include_prompt=False)
    embedder = Embedder.from_pretrained(folder)
    request = EmbedRequest(texts=TEXTS, token_ids=None, truncate=True)
    ids, embed_lengths = request_tokens(embedder.tokenizer, request, embedder.max_length, "input", embedder.prompt)
    np.testing.assert_allclose(embedder.encode_tokens(ids, embed_lengths), _st_vectors(folder), atol=1e-4)
