"""Training data: JSONL -> ArrayRecord TFDS dataset -> shuffled, host-sharded, resumable batches."""

import json
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tokenizers

import tiny
from diffemb_jax import batching
from diffemb_jax.embedding.prompts import SEPARATOR
from diffemb_jax.training import data

WORDS = tiny.WORDS[:40]  # row i is recognisable by its first word WORDS[i], token id WORD_ID + i
WORD_ID = 3


def row(i, fmt="echo", negatives=4):
    """Row i of format `fmt`: every text starts with WORDS[i]; negative j of msmarco rows has WORDS[j] second."""
    w = WORDS[i]
    base = {"query": f"{w} query", "positive": f"{w} document", "instruction": "retrieve the music"}
    if fmt == "msmarco_instructions":
        return base | {"negatives": [f"{w} {WORDS[j]} text" for j in range(negatives)]}
    return base | {"negative": f"{w} text"}


def write_jsonl(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def build(tmp_path, rows, fmt="echo", **kwargs):
    return data.build_dataset([write_jsonl(tmp_path / f"{fmt}.jsonl", rows)], fmt, tmp_path / "cache", **kwargs)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tokenizers.Tokenizer.from_file(str(tiny.write_tokenizer(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="module")
def echo_dir(tmp_path_factory):
    return build(tmp_path_factory.mktemp("echo"), [row(i) for i in range(10)])


def batches(source, tokenizer, n, *, global_batch_size=4, seed=0, num_negatives=1, **kwargs):
    it = data.TrainBatches(source, tokenizer, global_batch_size=global_batch_size, query_max_length=12,
                           doc_max_length=8, num_negatives=num_negatives, seed=seed, **kwargs)
    return it, [next(it) for _ in range(n)]


def row_ids(side):
    """Which row (i of WORDS[i]) each batch row holds: its first embedded token."""
    first = side["embed_mask"].argmax(axis=1)
    return [int(side["input_ids"][r, c]) - WORD_ID for r, c in enumerate(first)]


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for side in a:
        for key in a[side]:
            np.testing.assert_array_equal(a[side][key], b[side][key], err_msg=f"{side}/{key}")


@pytest.mark.parametrize("fmt, k", [("echo", 1), ("reasonaug", 1), ("msmarco_instructions", 3)])
def test_each_format_gives_fixed_shape_int32_batches(tmp_path, tokenizer, fmt, k):
    source = build(tmp_path, [row(i, fmt) for i in range(6)], fmt, num_negatives=k)
    _, [batch] = batches(source, tokenizer, 1, num_negatives=k)
    shapes = {"query": (4, 12), "positive": (4, 8), "negative": (4 * k, 8)}
    for side, shape in shapes.items():
        assert set(batch[side]) == {"input_ids", "padding_mask", "embed_mask"}
        for array in batch[side].values():
            assert array.shape == shape and array.dtype == np.int32
    queries, negatives = row_ids(batch["query"]), row_ids(batch["negative"])
    assert row_ids(batch["positive"]) == queries
    assert negatives == [q for q in queries for _ in range(k)]  # query i's negatives at rows i*k .. i*k+k-1
    if k > 1:  # the first k negatives, in order: their second token is WORDS[0..k-1]
        second = [int(batch["negative"]["input_ids"][r, batch["negative"]["embed_mask"][r].argmax() + 1]) - WORD_ID
                  for r in range(4 * k)]
        assert second == list(range(k)) * 4


def test_embed_mask_marks_the_text_after_the_instruction(echo_dir, tokenizer):
    _, [batch] = batches(echo_dir, tokenizer, 1)
    query, positive = batch["query"], batch["positive"]
    i = row_ids(query)[0]
    text_ids = tokenizer.encode(f"{WORDS[i]} query", add_special_tokens=False).ids
    assert query["input_ids"][0][query["embed_mask"][0] == 1].tolist() == text_ids
    prompt = tokenizer.encode(f"retrieve the music; {WORDS[i]} query").ids
    assert query["input_ids"][0][query["padding_mask"][0] == 1].tolist() == prompt
    assert SEPARATOR not in tokenizer.decode(query["input_ids"][0].tolist())
    # documents: everything but <s> is embedded; pads are 0 everywhere
    expected = positive["padding_mask"].copy()
    expected[:, 0] = 0
    np.testing.assert_array_equal(positive["embed_mask"], expected)
    assert not query["input_ids"][query["padding_mask"] == 0].any()


def test_shuffle_is_seeded_and_covers_each_epoch_once(echo_dir, tokenizer):
    _, first = batches(echo_dir, tokenizer, 4, seed=7)
    _, again = batches(echo_dir, tokenizer, 4, seed=7)
    _, other = batches(echo_dir, tokenizer, 4, seed=8)
    order = [row_ids(b["query"]) for b in first]
    assert order == [row_ids(b["query"]) for b in again]
    assert order != [row_ids(b["query"]) for b in other]
    # 10 rows, global batch 4: 2 batches per epoch, no row twice in an epoch, each epoch reshuffled
    epoch0, epoch1 = order[0] + order[1], order[2] + order[3]
    assert len(set(epoch0)) == len(set(epoch1)) == 8 and epoch0 != epoch1


def test_hosts_together_read_exactly_the_global_batch(echo_dir, tokenizer):
    _, whole = batches(echo_dir, tokenizer, 5)
    _, host0 = batches(echo_dir, tokenizer, 5, process_index=0, process_count=2)
    _, host1 = batches(echo_dir, tokenizer, 5, process_index=1, process_count=2)
    for w, a, b in zip(whole, host0, host1):
        assert not set(row_ids(a["query"])) & set(row_ids(b["query"]))
        joined = {side: {key: np.concatenate([a[side][key], b[side][key]]) for key in a[side]} for side in a}
        assert_batches_equal(joined, w)


def test_restored_iterator_continues_exactly(echo_dir, tokenizer):
    it, _ = batches(echo_dir, tokenizer, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]  # crosses an epoch boundary (2 batches per epoch)
    fresh, _ = batches(echo_dir, tokenizer, 0)
    fresh.set_state(state)
    for want in expected:
        assert_batches_equal(next(fresh), want)


def test_state_of_another_order_is_refused(echo_dir, tokenizer):
    it, _ = batches(echo_dir, tokenizer, 1, seed=1)
    other, _ = batches(echo_dir, tokenizer, 0, seed=2)
    with pytest.raises(ValueError, match="same data, seed"):
        other.set_state(it.get_state())


@pytest.mark.parametrize("fmt, bad, problem", [
    ("echo", '{"query": "a", "positive": "b", "negative": ', "not valid JSON"),
    ("echo", '["query", "positive"]', "expected a JSON object"),
    ("reasonaug", '{"query": "a", "negative": "c"}', "field 'positive' is missing"),
    ("echo", '{"query": "  ", "positive": "b", "negative": "c"}', "field 'query' is empty"),
    ("reasonaug", '{"query": "a", "positive": 3, "negative": "c"}', "field 'positive' must be a string"),
    ("echo", '{"query": "a", "positive": "b", "negative": "c", "instruction": ["x"]}',
     "field 'instruction' must be a string"),
    ("msmarco_instructions", '{"query": "a", "instruction": "i", "positive": "b", "negatives": ["c"]}',
     "'negatives' has 1 entries, fewer than num_negatives=2"),
    ("msmarco_instructions", '{"query": "a", "instruction": "i", "positive": "b", "negatives": ["c", 5]}',
     "field 'negatives\\[1\\]' must be a string"),
])
def test_bad_row_names_file_line_and_field(tmp_path, fmt, bad, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [row(0, fmt), "", row(1, fmt), bad, row(2, fmt)])
    with pytest.raises(data.BadRowError, match=f"{path}:4: .*{problem}"):
        data.build_dataset([path], fmt, tmp_path / "cache", num_negatives=2 if fmt == "msmarco_instructions" else 1)
    assert not list((tmp_path / "cache").glob("*/contrastive_pairs/*"))  # nothing half-written


def test_skip_bad_rows_skips_and_logs_the_count(tmp_path, caplog):
    path = write_jsonl(tmp_path / "some_bad.jsonl", [row(0), "{oops", row(1), {"query": "a"}, row(2)])
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        source = data.build_dataset([path], "echo", tmp_path / "cache", skip_bad_rows=True)
    assert tfds.builder_from_directory(str(source)).info.splits["train"].num_examples == 3
    [warning] = [r.getMessage() for r in caplog.records if r.name == data.__name__]
    assert f"{path}: skipped 2 bad rows (first: {path}:2:" in warning


def test_no_files_or_no_rows_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no training files"):
        data.build_dataset([], "echo", tmp_path / "cache")
    empty = write_jsonl(tmp_path / "empty.jsonl", ["{}"])
    with pytest.raises(ValueError, match="no usable rows"):
        data.build_dataset([empty], "echo", tmp_path / "cache", skip_bad_rows=True)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        data.build_dataset([tmp_path / "missing.jsonl"], "echo", tmp_path / "cache")


def test_building_the_same_inputs_again_reuses_the_dataset(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [row(i) for i in range(5)])
    first = data.build_dataset([path], "echo", tmp_path / "cache")
    mtimes = {f: f.stat().st_mtime_ns for f in first.iterdir()}
    assert data.build_dataset([str(path)], "echo", tmp_path / "cache") == first
    assert {f: f.stat().st_mtime_ns for f in first.iterdir()} == mtimes
    write_jsonl(path, [row(i) for i in range(6)])
    assert data.build_dataset([path], "echo", tmp_path / "cache") != first


def test_impossible_batching_is_refused(echo_dir, tokenizer):
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        batches(echo_dir, tokenizer, 0, process_count=3)
    with pytest.raises(ValueError, match="10 rows, fewer than global_batch_size=16"):
        batches(echo_dir, tokenizer, 0, global_batch_size=16)
    with pytest.raises(ValueError, match="rebuild it with build_dataset"):
        batches(echo_dir, tokenizer, 0, num_negatives=2)


def _texts(batch):
    """A packed step's texts: number -> (token ids, embedded token ids)."""
    out = {}
    for ids, numbers, embed in zip(batch["input_ids"], batch["segments"], batch["embed_mask"]):
        for n in set(numbers[numbers > 0].tolist()):
            out[n] = (ids[numbers == n].tolist(), ids[(numbers == n) & (embed > 0)].tolist())
    return out


def test_hosts_packed_steps_number_the_global_batch(tmp_path, tokenizer):
    """Each host packs its share of a step; together their texts carry the numbers the whole global
    batch has one text a row, with the same tokens and embedded tokens: query g is g + 1, its
    positive G + g + 1, its negative j 2G + g*k + j + 1."""
    k, g = 3, 4
    source = build(tmp_path, [row(i, "msmarco_instructions") for i in range(6)], "msmarco_instructions",
                   num_negatives=k)
    _, [whole] = batches(source, tokenizer, 1, num_negatives=k)
    one = _texts(batching.pack_step(whole, global_batch_size=g, num_negatives=k, pack=False))
    hosts, rows = {}, []
    for p in (0, 1):
        _, [part] = batches(source, tokenizer, 1, num_negatives=k, process_index=p, process_count=2)
        packed = batching.pack_step(part, global_batch_size=g, num_negatives=k, process_index=p)
        hosts |= _texts(packed)
        rows.append(len(packed["input_ids"]))
    assert hosts == one and sorted(one) == list(range(1, g * (2 + k) + 1))
    assert sum(rows) < g * (2 + k)  # several texts a row
    for q in range(g):  # the first embedded token names the training row; negative j's second is WORDS[j]
        first = one[q + 1][1][0]
        assert one[g + q + 1][1][0] == first
        for j in range(k):
            negative = one[2 * g + q * k + j + 1][1]
            assert negative[0] == first and negative[1] == WORD_ID + j


def test_padded_rows_and_lengths_take_few_values():
    assert [batching.padded_rows(n, 1, 100) for n in range(1, 14)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16]
    assert [batching.padded_rows(n, 2, 100) for n in (1, 2, 3, 5, 7, 9)] == [2, 2, 4, 6, 8, 12]
    assert batching.padded_rows(13, 2, 13) == 14  # never past one text a row (rounded up to the shards)
    def sides(longest, width=100):
        mask = np.zeros((2, width), np.int32)
        mask[0, :longest] = mask[1, :5] = 1
        return {side: {"input_ids": mask, "padding_mask": mask, "embed_mask": mask} for side in batching.SIDES}

    assert [batching.row_length(sides(n)) for n in (5, 32, 33, 64, 65, 100)] == [32, 32, 64, 64, 100, 100]
    assert batching.row_length(sides(5), pack=False) == 100
    assert batching.pack_step(sides(40), global_batch_size=2, num_negatives=1)["input_ids"].shape[1] == 64
    batch = batching.pad_rows({"input_ids": np.ones((3, 4), np.int32)}, 4)
    assert batch["input_ids"].shape == (4, 4) and not batch["input_ids"][3].any()
    with pytest.raises(ValueError, match="more than 2"):
        batching.pad_rows(batch, 2)


def test_simcse_rows_are_their_own_positive_with_no_negatives(tmp_path, tokenizer):
    rows = [{"text": f"{WORDS[i]} sentence"} | ({"instruction": "retrieve the music"} if i % 2 else {})
            for i in range(6)]
    source = build(tmp_path, rows, "simcse", num_negatives=0)
    _, [batch] = batches(source, tokenizer, 1, num_negatives=0)
    assert batch["negative"]["input_ids"].shape == (0, 8)
    assert row_ids(batch["query"]) == row_ids(batch["positive"])  # the same text on both sides
    packed = batching.pack_step(batch, global_batch_size=4, num_negatives=0)
    assert sorted(set(packed["segments"].ravel()) - {0}) == list(range(1, 9))  # 4 queries + 4 positives
    with pytest.raises(ValueError, match="supports exactly 0"):
        build(tmp_path, rows, "simcse", num_negatives=1)
    with pytest.raises(data.BadRowError, match="field 'text' is missing"):
        build(tmp_path, [{"query": "a"}], "simcse", num_negatives=0)
