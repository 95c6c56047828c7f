"""BRIGHT (Su et al., 2024): reasoning-intensive retrieval, the paper's second benchmark.

Twelve domains of the dataset repository xlangai/BRIGHT, each a split of its configs `documents`
(id, content) and `examples` (id, query, gold_ids, gold_ids_long, excluded_ids). Every query searches
its domain's whole corpus for the top 200 documents (the reference's top_k) after its
excluded_ids are taken out of the corpus (BRIGHT's rule: documents that would leak the answer,
"N/A" meaning none); nDCG@10 is the score. `long=True` scores the `long_documents` corpus against
gold_ids_long instead (the eight StackExchange-style domains have one).

Instructions are the reference code's per-domain ones (its task_to_instructions.json, wording kept,
typo included), without their trailing colon or the "Instruct: ... Query:" wrapper two of them carry:
the recipe's own "{instruction}; " format takes their place. Domains the reference left out get
BRIGHT's own "Given a {domain} post, retrieve relevant passages that help answer the post".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from diffemb_jax.errors import ConfigError
from diffemb_jax.evaluation import hub_data
from diffemb_jax.evaluation.benchmark import Embeds, checked_set, markdown_table, mean, retrieve
from diffemb_jax.evaluation.retrieval import DEFAULT_MEASURES, RetrievalSet, evaluate_run

DEFAULT_SOURCE = "xlangai/BRIGHT"
TOP_K = 200
# domain -> (table column, query instruction), in the paper's (and BRIGHT's) column order.
DOMAINS = {
    "biology": ("Bio.", "Given a biology post, retrieve relevant passages that help answer the post"),
    "earth_science": ("Earth.", "Given a earth science post, retrieve relevant passages that help answer the post"),
    "economics": ("Econ.", "Given a economics post, retrieve relevant passages that help answer the post"),
    "psychology": ("Psy.", "Given a psychology post, retrieve relevant passages that help answer the post"),
    "robotics": ("Rob.", "Given a robotics post, retrieve relevant passages that help answer the post"),
    "stackoverflow": ("Stack.", "Given a post, retrieve relevant passages that help answer the post"),
    "sustainable_living": ("Sus.", "Given a sustainable living post, retrieve relevant passages that help answer "
                                   "the post"),
    "leetcode": ("Leet.", "Given a coding problem, retrieve the relevant problems that can be solved by the similar "
                          "algorithms or data structures"),
    "pony": ("Pony", "Given a Pony question, retrieve relevant passages that help answer the question"),
    "aops": ("AoPS", "Given a problem, rretrieve the relevant problems that can be solved by the similar math "
                     "theorems"),
    "theoremqa_questions": ("TheoQ.", "Given a problem, retrieve the relevant problems that can be solved by the "
                                      "similar theorems"),
    "theoremqa_theorems": ("TheoT.", "Given a problem, retrieve the relevant theorems that help solve the given "
                                     "problem"),
}
LONG_DOMAINS = ("biology", "earth_science", "economics", "psychology", "robotics", "stackoverflow",
                "sustainable_living", "pony")
# The paper's numbers, one row each with its source (DESIGN.md quotes them): they come from different
# experiments and baselines, so no two share a row. (label, column, nDCG@10)
PAPER_ROWS = (
    ("DiffEmbed (Dream-7B), paper Figure 1c (BRIGHT average)", "Avg", 0.33),
    ("LLM2Vec-adapted LLM, paper Figure 1c (BRIGHT average)", "Avg", 0.25),
    ("DiffEmbed (Dream-7B), paper, after 10.9k ReasonAug samples", "TheoQ.", 0.483),
    ("Qwen2.5-7B, paper, after 10.9k ReasonAug samples", "TheoQ.", 0.402),
)


@dataclass
class BrightResult:
    metrics: dict[str, dict[str, float]]  # domain -> nDCG@10, MAP@100, Recall@100, MRR@10
    sizes: dict[str, dict] = field(default_factory=dict)
    long: bool = False

    @property
    def average(self) -> float:
        return mean([m["ndcg@10"] for m in self.metrics.values()])


def load_domain(root, domain: str, long: bool = False) -> tuple[RetrievalSet, dict[str, list[str]]]:
    """(retrieval set, excluded document ids by query) of one domain."""
    docs_config, gold_field = ("long_documents", "gold_ids_long") if long else ("documents", "gold_ids")
    where = f"BRIGHT {domain} ({root}, configs {docs_config} and examples)"
    corpus = {str(hub_data.field(r, "id", where)): str(hub_data.field(r, "content", where))
              for r in hub_data.read_split(root, docs_config, domain)}
    queries, qrels, excluded = {}, {}, {}
    for r in hub_data.read_split(root, "examples", domain):
        qid = str(hub_data.field(r, "id", where))
        queries[qid] = str(hub_data.field(r, "query", where))
        qrels[qid] = {str(d): 1 for d in hub_data.field(r, gold_field, where) or ()}
        excluded[qid] = [str(d) for d in r.get("excluded_ids") or () if str(d) != "N/A"]
    qrels = {q: judged for q, judged in qrels.items() if judged}  # a query without gold documents is not scored
    return checked_set(where, queries, corpus, qrels), excluded


def load_bright(source=DEFAULT_SOURCE, domains: Sequence[str] | None = None, long: bool = False
                ) -> dict[str, tuple[RetrievalSet, dict[str, list[str]]]]:
    """Every domain's retrieval set and excluded ids, read and checked (before any model is loaded)."""
    allowed = LONG_DOMAINS if long else tuple(DOMAINS)
    domains = list(domains or allowed)
    unknown = [d for d in domains if d not in allowed]
    if unknown:
        raise ConfigError(f"unknown BRIGHT domain(s) {unknown}{' for long documents' if long else ''}; "
                         f"choose from {list(allowed)}")
    root = hub_data.open_dataset(source)
    return {d: load_domain(root, d, long) for d in domains}


def score_bright(embedder: Embeds, data: dict[str, tuple[RetrievalSet, dict[str, list[str]]]], *,
                 long: bool = False, instructions: dict[str, str] | None = None, top_k: int = TOP_K) -> BrightResult:
    """instructions: {domain: instruction} replacing the defaults ("" for none)."""
    result = BrightResult(metrics={}, long=long)
    for domain, (rset, excluded) in data.items():
        instruction = (instructions or {}).get(domain, DOMAINS[domain][1]) or None
        run = retrieve(embedder, rset, instruction=instruction, top_k=top_k, excluded=excluded)
        result.metrics[domain] = evaluate_run(rset.qrels, run, DEFAULT_MEASURES)
        result.sizes[domain] = {"queries": len(rset.qrels), "documents": len(rset.corpus)}
    return result


def table(result: BrightResult) -> str:
    """The paper's layout: nDCG@10 by domain and the average, ours and the paper's where known."""
    columns = [DOMAINS[d][0] for d in result.metrics] + ["Avg"]
    rows = [("diffemb-jax (this run)", [m["ndcg@10"] for m in result.metrics.values()] + [result.average])]
    if not result.long:
        for label, column, value in PAPER_ROWS:
            # the paper's average covers all twelve domains: beside ours only when we scored them all
            if column in columns and (column != "Avg" or set(result.metrics) == set(DOMAINS)):
                rows.append((label, [value if c == column else None for c in columns]))
    return markdown_table(columns, rows)
