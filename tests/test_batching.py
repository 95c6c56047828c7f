"""The batching floor: texts into rows with numpy and the standard library alone, and the layouts it
makes (first fit decreasing, the int32 arrays), checked by hand-worked examples."""

import ast
import sys
from pathlib import Path

import numpy as np
import pytest

from diffemb_jax import batching

PACKAGE = Path(batching.__file__).parent


def test_batching_imports_numpy_and_the_standard_library_alone():
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                assert (top in sys.stdlib_module_names or top == "numpy"
                        or name.startswith("diffemb_jax.batching")), f"{path.name} imports {name}"


def test_first_fit_decreasing_fills_each_row_with_the_longest_that_fit():
    # 7 opens a row and takes 3; 5 opens the next, takes 4 (no 3 left) and 1; 2 and 2 share the last
    assert batching.pack_rows([3, 7, 2, 5, 4, 1, 2], 10) == [[1, 0], [3, 4, 5], [2, 6]]
    with pytest.raises(ValueError, match="does not fit"):
        batching.pack_rows([11], 10)


def test_pack_batch_numbers_each_rows_texts_and_marks_their_embedded_tails():
    ids, segment_ids, embed_mask = batching.pack_batch([[5, 6, 7], [8], [9, 9]], [2, 1, 1], [[0, 1], [2]], 5, 3)
    np.testing.assert_array_equal(ids, [[5, 6, 7, 8, 0], [9, 9, 0, 0, 0], [0] * 5])
    np.testing.assert_array_equal(segment_ids, [[1, 1, 1, 2, 0], [1, 1, 0, 0, 0], [0] * 5])
    np.testing.assert_array_equal(embed_mask, [[0, 1, 1, 1, 0], [0, 1, 0, 0, 0], [0] * 5])
    assert ids.dtype == segment_ids.dtype == embed_mask.dtype == np.int32
    with pytest.raises(ValueError, match="more than its 3"):
        batching.pack_batch([[1, 2], [3, 4]], [1, 1], [[0, 1]], 3, 1)


def test_bucket_lengths_are_powers_of_two_and_the_max_length():
    assert batching.bucket_lengths(100) == [32, 64, 100]
    assert batching.bucket_lengths(32) == [32]


def _random_sides(rng, queries, length):
    """A step's sides, every text between a random floor and cap, one perhaps longer."""
    cap = rng.randint(1, length + 1)
    lengths = rng.randint(rng.randint(1, cap + 1), cap + 1, 3 * queries)
    if rng.rand() < 0.5:
        lengths[rng.randint(3 * queries)] = rng.randint(cap, length + 1)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    return {side: {"input_ids": m * 5, "padding_mask": m, "embed_mask": m.copy()}
            for side, m in zip(("query", "positive", "negative"), np.split(mask, 3))}


@pytest.mark.parametrize("multiple,shortest", [(1, 32), (2, 32), (1, 64)])
def test_step_shapes_are_every_shape_a_packed_step_takes(multiple, shortest):
    """Random steps packed as the trainer packs them (pack_step, then padded_rows): every shape met is
    in step_shapes, and random search meets every one of them (the bound is tight)."""
    rng = np.random.RandomState(0)
    queries, most = 4, 12  # 12 texts a step: rows 1 ... 12
    possible = batching.step_shapes(96, most, multiple, shortest=shortest)
    met = set()
    for _ in range(3000):
        sides = _random_sides(rng, queries, 96)
        batch = batching.pack_step(sides, global_batch_size=queries, num_negatives=1,
                                   length=batching.row_length(sides, shortest=shortest))
        met.add((batching.padded_rows(len(batch["input_ids"]), multiple, most), batch["input_ids"].shape[1]))
    assert met == set(possible)
    assert min(n for _, n in possible) == shortest and len(possible) == (3 if shortest == 32 else 2) * len(
        {r for r, _ in possible})  # lengths 32, 64, 96, or 64, 96: the cap drops the shortest
    assert batching.step_shapes(96, most, multiple, pack=False) == [(most, 96)]
