"""FollowIR (Weller et al., 2024): instruction-following retrieval, the paper's third benchmark.

Three reranking tasks, Robust04, News21 and Core17, as MTEB ships them (dataset repositories
mteb/<Task>InstructionRetrieval, configs corpus, queries, default (qrels), instruction, top_ranked,
qrel_diff). Each query appears twice, "<id>-og" with its original instruction (the TREC narrative)
and "<id>-changed" with an altered one that makes some relevant documents irrelevant; the text
embedded is "<query> <instruction>" (MTEB's join), behind the recipe's task instruction. Each
query reranks only its top_ranked candidates. Scores:

- the base metric on the original queries: MAP@1000 (Robust04, Core17) or nDCG@5 (News21);
- p-MRR over the documents whose relevance the change removed (qrel_diff): for each, with r_og and
  r_new its ranks (1-based; score descending, then doc id descending; unranked = run length + 1),
  r_new / r_og - 1 when it moved up, 1 - r_og / r_new when it moved down; averaged per query,
  then over queries. Positive means the model followed the changed instruction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from diffemb_jax.embedding.files import InputError
from diffemb_jax.errors import ConfigError
from diffemb_jax.evaluation import hub_data
from diffemb_jax.evaluation.beir import document_text
from diffemb_jax.evaluation.benchmark import Embeds, checked_set, markdown_table, mean, rerank
from diffemb_jax.evaluation.retrieval import Qrels, Run, check_ids, evaluate_run

# Table order of the paper: task -> (dataset repository, base measure, its public name).
TASKS = {"Robust04": ("mteb/Robust04InstructionRetrieval", "map_cut_1000", "MAP@1000"),
         "News21": ("mteb/News21InstructionRetrieval", "ndcg_cut_5", "nDCG@5"),
         "Core17": ("mteb/Core17InstructionRetrieval", "map_cut_1000", "MAP@1000")}
# The reference code's instruction for this task type (mteb's default prompt, "InstructionRetrieval").
INSTRUCTION = "Retrieve text based on user query"
OG, CHANGED = "-og", "-changed"


@dataclass
class FollowIRTask:
    queries: dict[str, str]  # "<id>-og" / "<id>-changed" -> query and instruction
    corpus: dict[str, str]
    qrels: Qrels  # both kinds of query ids
    candidates: dict[str, list[str]]  # top_ranked
    changed: dict[str, list[str]]  # "<id>" -> documents no longer relevant under the changed instruction


@dataclass
class FollowIRResult:
    scores: dict[str, dict[str, float]]  # task -> {"base": ..., "p-MRR": ..., "changed_base": ...}
    sizes: dict[str, dict] = field(default_factory=dict)

    def average(self, key: str) -> float:
        return mean([s[key] for s in self.scores.values()])


def task_folder(source: str | Path | None, task: str) -> Path:
    """A task's dataset folder: <source>/<Task>InstructionRetrieval or <source>/<task lower-case>, or
    with no source the HF cache's copy of mteb/<Task>InstructionRetrieval."""
    repo = TASKS[task][0]
    if source is None:
        return hub_data.open_dataset(repo)
    source = Path(source)
    if not source.is_dir():
        raise InputError(f"{source}: no such folder; expected a folder with one subfolder a FollowIR task "
                         f"({', '.join(repo.split('/')[1] for repo, _, _ in TASKS.values())})")
    for name in (repo.split("/")[1], task.lower(), task):
        if (source / name).is_dir():
            return source / name
    raise InputError(f"{source}: no subfolder {repo.split('/')[1]} (or {task.lower()}) for FollowIR {task}; "
                     "download its dataset repository there, or choose tasks with --tasks")


def load_task(folder: Path, task: str) -> FollowIRTask:
    where = f"FollowIR {task} ({folder})"
    qrels_config = "default" if hub_data.has_config(folder, "default") else "qrels"
    corpus = {}
    for r in hub_data.read_config(folder, "corpus"):
        docid = _id(r, f"{where}, corpus")
        corpus[docid] = document_text(r.get("title"), str(hub_data.field(r, "text", where)))
    instructions = {}
    if hub_data.has_config(folder, "instruction"):
        instructions = {str(hub_data.field(r, "query-id", where)): str(hub_data.field(r, "instruction", where))
                        for r in hub_data.read_config(folder, "instruction")}
    queries = {}
    for r in hub_data.read_config(folder, "queries"):
        qid = _id(r, f"{where}, queries")
        instruction = instructions.get(qid, r.get("instruction"))
        text = str(hub_data.field(r, "text", where))
        queries[qid] = f"{text} {instruction}" if instruction is not None else text
    qrels: Qrels = {}
    for r in hub_data.read_config(folder, qrels_config):
        qrels.setdefault(str(hub_data.field(r, "query-id", where)), {})[str(hub_data.field(r, "corpus-id", where))] = \
            int(hub_data.field(r, "score", where))
    checked_set(where, queries, corpus, qrels)
    candidates = {str(hub_data.field(r, "query-id", where)): [str(d) for d in hub_data.field(r, "corpus-ids", where)]
                  for r in hub_data.read_config(folder, "top_ranked")}
    changed = {str(hub_data.field(r, "query-id", where)): [str(d) for d in hub_data.field(r, "corpus-ids", where)]
               for r in hub_data.read_config(folder, "qrel_diff", "qrel_diff")}
    _check(where, queries, corpus, candidates, changed)
    return FollowIRTask(queries, corpus, qrels, candidates, changed)


def _id(row: dict, where: str) -> str:
    value = row.get("_id", row.get("id"))
    if value is None or value == "":
        raise InputError(f"{where}: a row has neither an \"_id\" nor an \"id\" field (fields: {', '.join(sorted(row))})")
    return str(value)


def _check(where, queries, corpus, candidates, changed) -> None:
    check_ids(where, queries, corpus, candidates, what="top_ranked")
    for qid in changed:
        for kind in (OG, CHANGED):
            if qid + kind not in candidates:
                raise InputError(f"{where}: qrel_diff names query {qid!r} but top_ranked has no {qid + kind!r}")
    if not changed:
        raise InputError(f"{where}: qrel_diff is empty; p-MRR needs the documents whose relevance changed")


def p_mrr(og_run: Run, changed_run: Run, changed: dict[str, list[str]]) -> float:
    """FollowIR's pairwise MRR (see the module docstring); runs keyed by the plain query id."""
    per_query = []
    for qid, docs in changed.items():
        og_ranks, new_ranks = _ranks(og_run[qid]), _ranks(changed_run[qid])
        values = []
        for doc in docs:
            r_og = og_ranks.get(doc, len(og_ranks) + 1)
            r_new = new_ranks.get(doc, len(new_ranks) + 1)
            values.append(r_new / r_og - 1 if r_og >= r_new else 1 - r_og / r_new)
        if values:
            per_query.append(sum(values) / len(values))
    return mean(per_query)


def _ranks(docs: dict[str, float]) -> dict[str, int]:
    ordered = sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)
    return {doc: i + 1 for i, (doc, _) in enumerate(ordered)}


def score_task(embedder: Embeds, data: FollowIRTask, task: str, instruction: str | None = INSTRUCTION) -> dict:
    run = rerank(embedder, data.queries, data.corpus, data.candidates, instruction=instruction)
    measure = TASKS[task][1]
    og = {q: r for q, r in run.items() if q.endswith(OG)}
    new = {q: r for q, r in run.items() if q.endswith(CHANGED)}
    og_qrels = {q: j for q, j in data.qrels.items() if q.endswith(OG)}
    new_qrels = {q: j for q, j in data.qrels.items() if q.endswith(CHANGED)}
    return {
        "base": next(iter(evaluate_run(og_qrels, og, [measure]).values())),
        "changed_base": next(iter(evaluate_run(new_qrels, new, [measure]).values())) if new_qrels else float("nan"),
        "p-MRR": p_mrr({q[:-len(OG)]: r for q, r in og.items()},
                       {q[:-len(CHANGED)]: r for q, r in new.items()}, data.changed),
    }


def load_followir(source=None, tasks: Sequence[str] = tuple(TASKS)) -> dict[str, FollowIRTask]:
    """Every task's data, read and checked (before any model is loaded)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown FollowIR task(s) {unknown}; choose from {list(TASKS)}")
    return {task: load_task(task_folder(source, task), task) for task in tasks}


def score_followir(embedder: Embeds, data: dict[str, FollowIRTask], instruction: str | None = INSTRUCTION
                   ) -> FollowIRResult:
    result = FollowIRResult(scores={})
    for task, task_data in data.items():
        result.scores[task] = score_task(embedder, task_data, task, instruction)
        result.sizes[task] = {"queries": len(task_data.candidates), "documents":
                              len({d for docs in task_data.candidates.values() for d in docs})}
    return result


def table(result: FollowIRResult) -> str:
    """The paper's layout: base metric and p-MRR per task, then their averages (x100)."""
    columns, values = [], []
    for task, s in result.scores.items():
        columns += [f"{task} {TASKS[task][2]}", f"{task} p-MRR"]
        values += [s["base"], s["p-MRR"]]
    columns += ["Avg score", "Avg p-MRR"]
    values += [result.average("base"), result.average("p-MRR")]
    text = markdown_table(columns, [("diffemb-jax (this run)", values)])
    return text + ("\n\nThe paper's Figure 1c gives instruction-following retrieval as a single average: "
                   "DiffEmbed (Dream-7B) 21 vs 19 for the LLM2Vec-adapted LLM; per-task numbers are not "
                   "reproduced here.")
