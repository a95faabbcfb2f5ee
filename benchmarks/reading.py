"""reading: right answers on real news (RealTimeQA) per stage, kfresh vs a LangChain chain on the same model.

Every evidence passage of the dataset is streamed into a `kfresh serve` as a document (`valid_from` = the
question's date, `metadata.qid` = the question id), then each question of the chosen period is asked as
free text. One `vllm serve` hosts the model for everything in the run: kfresh uses it as its remote
backend, the LangChain peer calls it through `ChatOpenAI`, so the model, its settings and its chat
template are the same on every path. Stages:
- closed-book: the model alone (Answer with closed_book);
- end to end: Answer as a chatbot would call it;
- hit@k: the question's evidence among the top k of Retrieve; shown: the evidence among the passages the
  answer was given (its citations); right given shown;
- oracle: the evidence passage alone (Answer with the filter qid=<id>): what the model can read at best;
- deleted: the same questions after their evidence was deleted: a reply of "not in the documents" is right,
  any other reply is a false answer (and on the end-to-end pass, such a reply is a false refusal).
A variant (the ablation) changes one lever: server settings (a restart) or the request's k.
Right = the right choice appears in the answer and no other choice does (benchmarks/realtimeqa.py).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kfresh.benchmarks import realtimeqa
from kfresh.benchmarks.common import SuiteOptions, environment, percentiles
from kfresh.benchmarks.realtimeqa import Question
from kfresh.benchmarks.report import Result, Table

REFUSAL = re.compile(r"not in the documents|could not find|couldn't find|do(?:n't| not) know|no information", re.I)


class Variant(BaseModel):
    """One lever of the ablation: server settings (dotted keys, as `kfresh serve --KEY VALUE`) and the request's k."""

    model_config = ConfigDict(extra="forbid")
    name: str
    settings: dict[str, Any] = Field(default_factory=dict)
    k: int = Field(0, ge=0, description="Passages per Answer; 0 = the server's answer.default_k.")
    model: str = Field("", description="Generator folder served for this variant; empty = the configured generator.")


PREVIOUS = {
    "answer.prompt_format": "system", "answer.prompt_passages": 0, "answer.quote": False, "answer.rerank_weight": 0
}  # fmt: skip


def default_variants() -> list[Variant]:
    """The headline (today's defaults), the defaults before the reading step, then one lever changed at a time."""
    return [
        Variant(name="default"),
        Variant(name="before: system prompt, all k passages, no quote", settings=PREVIOUS),
        Variant(name="no quote", settings={"answer.quote": False}),
        Variant(name="no rerank (embedder order)", settings={"answer.rerank_weight": 0}),
        Variant(name="rerank within k (pool=3)", settings={"answer.rerank_pool": 3}),
        Variant(name="format=system", settings={"answer.prompt_format": "system"}),
        Variant(name="format=user", settings={"answer.prompt_format": "user"}),
        Variant(name="prompt_passages=all (3)", settings={"answer.prompt_passages": 0}),
        Variant(name="prompt_passages=2", settings={"answer.prompt_passages": 2}),
        Variant(name="k=1", k=1),
        Variant(name="k=5", k=5),
        Variant(name="min_score=0.35", settings={"answer.min_score": 0.35}),
        Variant(name="no named conflicts (similarity only)", settings={"answer.named_conflict_similarity": 1.01}),
    ]


class ReadingOptions(SuiteOptions):
    dataset: str = Field(
        "", description="Path of realtimeqa-2025.jsonl (default $KFRESH_REALTIMEQA or ../shared/datasets/)."
    )
    period: realtimeqa.Period = Field(
        "test", description="Questions asked: test = October-December (report), dev = January-September (tuning)."
    )
    sample: int = Field(
        0, ge=0, description="A fixed spread-out sample of this many questions of the period (0 = all)."
    )
    hit_k: int = Field(4, ge=1, le=50, description="k of the hit@k stage.")
    concurrency: int = Field(8, ge=1, le=64, description="Answers in flight at once.")
    max_tokens: int = Field(64, ge=1, description="Tokens per answer (greedy).")
    variants: list[Variant] = Field(
        default_factory=default_variants, description="Ablation: one lever per variant; the first is the headline."
    )
    closed_book: bool = Field(True, description="Measure the model alone.")
    deleted: bool = Field(True, description="Delete the evidence and ask again (refusals vs false answers).")
    peer: bool = Field(True, description="The LangChain chain on the same model (needs langchain-openai).")
    ttft_probe: int = Field(12, ge=0, description="Sequential answers per variant for an unloaded TTFT p50 (0 = skip).")
    reader: str = Field(
        "",
        description="Folder of a reader (`kfresh provision --reader-data`, trained on dev only): adds the variants "
        "'reader' and 'reader, prompt_passages=all (3)', the same settings on that generator.",
    )

    def all_variants(self) -> list[Variant]:
        """The variants, plus the reader's when `reader` names one."""
        if not self.reader:
            return list(self.variants)
        return [*self.variants, Variant(name="reader", model=self.reader),
                Variant(name="reader, prompt_passages=all (3)", model=self.reader, settings={"answer.prompt_passages": 0})]  # fmt: skip

    @classmethod
    def quick(cls) -> ReadingOptions:
        return cls(sample=6, concurrency=4, max_tokens=24, ttft_probe=2,
                   variants=[Variant(name="default"), Variant(name="k=1", k=1), Variant(name="before", settings=PREVIOUS)])  # fmt: skip


def questions_for(opts: ReadingOptions) -> tuple[list[Question], list[Question]]:
    """(every row as the corpus, the questions asked)."""
    corpus = realtimeqa.load(opts.dataset)
    return corpus, realtimeqa.sample(realtimeqa.period(corpus, opts.period), opts.sample)


def ingest(addr: str, corpus: Sequence[Question]) -> float:
    """Stream every evidence passage as a document; returns seconds until all of it was searchable."""
    from kfresh.client import document
    from kfresh.client.sources import parse_time
    from kfresh.testing.servers import client

    start = time.perf_counter()
    docs = [document(q.id, q.evidence, source=q.source, metadata={"qid": q.id}, valid_from=parse_time(q.date, q.id))
            for q in corpus]  # fmt: skip
    with client(addr) as c:
        for _ in c.ingest(docs, timeout=600):
            pass
        if not c.wait_searchable(300).searchable:
            raise TimeoutError("the RealTimeQA corpus was not searchable after 300 s")
    return time.perf_counter() - start


async def _answer(c: Any, q: Question, **options: Any) -> dict[str, Any]:
    text, done = [], None
    async for event in c.answer(q.question, timeout=600, **options):
        if event.HasField("done"):
            done = event.done
        else:
            text.append(event.delta)
    answer = "".join(text)
    cited = [cit.doc_id for cit in done.citations] if done else []
    return {"id": q.id, "answer": answer, "cited": cited, "finish": done.finish_reason if done else "",
            "ttft_ms": done.timings.time_to_first_token_ms if done else 0.0}  # fmt: skip


async def ask_all(
    addr: str, questions: Sequence[Question], opts: ReadingOptions, *, per_question: Any = None, **options: Any
) -> list[dict[str, Any]]:
    from kfresh.testing.servers import aclient

    slots = asyncio.Semaphore(opts.concurrency)
    async with aclient(addr) as c:

        async def one(q: Question) -> dict[str, Any]:
            async with slots:
                extra = per_question(q) if per_question else {}
                return await _answer(c, q, max_tokens=opts.max_tokens, temperature=0.0, **options, **extra)

        return list(await asyncio.gather(*(one(q) for q in questions)))


async def hits_at(addr: str, questions: Sequence[Question], k: int) -> dict[str, list[str]]:
    from kfresh.testing.servers import aclient

    async with aclient(addr) as c:
        replies = await asyncio.gather(*(c.retrieve(q.question, k=k, timeout=60) for q in questions))
    return {q.id: [h.doc_id for h in r.chunks] for q, r in zip(questions, replies)}


async def ttft_probe(addr: str, questions: Sequence[Question], n: int, k: int) -> list[float]:
    from kfresh.testing.servers import aclient

    out = []
    async with aclient(addr) as c:
        for q in list(questions)[:n]:
            out.append((await _answer(c, q, k=k, max_tokens=4, temperature=0.0))["ttft_ms"])
    return out


def measure_group(url: str, settings: dict[str, Any], variants: list[Variant], corpus: Sequence[Question],
                  questions: Sequence[Question], opts: ReadingOptions, *, closed_book: bool) -> dict[str, Any]:  # fmt: skip
    """One server with `settings`: every variant that shares them, then (optionally) the deleted-evidence pass."""
    from kfresh.testing.servers import client, kfresh_server

    remote = {"generation.backend": "remote", "generation.remote_url": url, "generation.remote_timeout_s": 600,
              "answer.max_concurrent": max(32, opts.concurrency)}  # fmt: skip
    out: dict[str, Any] = {"settings": settings, "variants": {}}
    with kfresh_server({**remote, **settings}, model=True) as target:
        out["ingest_s"] = ingest(target.addr, corpus)
        out["hits"] = asyncio.run(hits_at(target.addr, questions, opts.hit_k))
        if closed_book:  # once per run, like retrieval's levers: neither depends on the answer settings
            deep = asyncio.run(hits_at(target.addr, questions, 50))
            out["retrieval_levers"] = retrieval_levers(corpus, questions, deep, depth=50)
            out["closed_book"] = asyncio.run(ask_all(target.addr, questions, opts, closed_book=True))
        for v in variants:
            rec: dict[str, Any] = {"k": v.k}
            rec["e2e"] = asyncio.run(ask_all(target.addr, questions, opts, k=v.k))
            rec["oracle"] = asyncio.run(
                ask_all(target.addr, questions, opts, k=1, per_question=lambda q: {"filter": {"qid": q.id}})
            )
            if opts.ttft_probe:
                rec["ttft_probe_ms"] = asyncio.run(ttft_probe(target.addr, questions, opts.ttft_probe, v.k))
            out["variants"][v.name] = rec
        if opts.deleted:
            with client(target.addr) as c:
                for q in questions:
                    c.delete(q.id, timeout=60)
                c.wait_searchable(60)
            for v in variants:
                out["variants"][v.name]["deleted"] = asyncio.run(ask_all(target.addr, questions, opts, k=v.k))
    return out


def retrieval_levers(corpus: Sequence[Question], questions: Sequence[Question], dense: dict[str, list[str]], *,
                     depth: int, rrf_k: int = 60) -> dict[str, Any]:  # fmt: skip
    """hit@1..4 of kfresh's dense Retrieve, of BM25 (bm25s) over the same passages, and of their reciprocal
    rank fusion (the hybrid-retrieval lever), on the same questions."""
    try:
        import bm25s
    except ImportError as exc:
        return {"skipped": f"bm25s is not installed ({exc})"}
    retriever = bm25s.BM25()
    retriever.index(
        bm25s.tokenize([q.evidence for q in corpus], stopwords="en", show_progress=False), show_progress=False
    )
    tokens = bm25s.tokenize([q.question for q in questions], stopwords="en", show_progress=False)
    found, _ = retriever.retrieve(tokens, k=min(depth, len(corpus)), show_progress=False)
    lexical = {q.id: [corpus[int(j)].id for j in row] for q, row in zip(questions, found)}
    fused = {}
    for q in questions:
        score: dict[str, float] = {}
        for ranking in (dense[q.id], lexical[q.id]):
            for rank, doc in enumerate(ranking):
                score[doc] = score.get(doc, 0.0) + 1.0 / (rrf_k + rank)
        fused[q.id] = sorted(score, key=lambda d: -score[d])
    n = len(questions)
    return {name: {f"hit@{k}": sum(q.id in ranks[q.id][:k] for q in questions) / n for k in (1, 2, 3, 4)}
            for name, ranks in (("dense (kfresh Retrieve)", dense), ("BM25 (bm25s)", lexical), (f"hybrid: RRF k={rrf_k}", fused))}  # fmt: skip


def run_peer(
    url: str, corpus: Sequence[Question], questions: Sequence[Question], opts: ReadingOptions
) -> dict[str, Any]:
    from kfresh.benchmarks import reading_peer
    from kfresh.core.config import KfreshConfig
    from kfresh.indexer.embedding.embedder import create_embedder

    try:
        import langchain_openai  # noqa: F401
    except ImportError as exc:
        return {"skipped": f"langchain-openai is not installed ({exc})"}
    encode = create_embedder(KfreshConfig()).encode
    store = reading_peer.build_store(corpus, encode)
    answers = asyncio.run(reading_peer.ask_all(store, url, questions, k=opts.hit_k, max_tokens=opts.max_tokens,
                                               concurrency=opts.concurrency))  # fmt: skip
    return {
        "kind": f"LangChain FAISS (MiniLM, k={opts.hit_k}), RAG prompt, ChatOpenAI to vllm serve",
        "answers": answers,
    }


def run(opts: ReadingOptions, *, addr: str | None = None, quick: bool = False, command: str = "") -> Result:
    from kfresh.core.config import KfreshConfig
    from kfresh.models import generator_path
    from kfresh.testing.servers import vllm_serve

    if addr:
        raise SystemExit(
            "kfresh bench reading starts its own servers (one per ablation setting); --addr is not supported"
        )
    cfg = KfreshConfig()
    corpus, questions = questions_for(opts)
    env = environment(
        model="SmolLM2-135M-Instruct", dtype=cfg.generation.dtype, dataset=str(realtimeqa.dataset_path(opts.dataset))
    )
    by_model: dict[str, dict[str, tuple[dict[str, Any], list[Variant]]]] = {}
    for v in opts.all_variants():
        groups = by_model.setdefault(v.model, {})
        groups.setdefault(repr(sorted(v.settings.items())), (v.settings, []))[1].append(v)
    raw: dict[str, Any] = {"questions": [q.id for q in questions], "groups": []}
    started = time.perf_counter()
    for model, groups in by_model.items():
        first = not raw["groups"]
        with vllm_serve(model or generator_path(cfg.models), dtype=cfg.generation.dtype) as url:
            for i, (settings, variants) in enumerate(groups.values()):
                raw["groups"].append(measure_group(url, settings, variants, corpus, questions, opts,
                                                   closed_book=opts.closed_book and first and i == 0))  # fmt: skip
            if opts.peer and first:
                raw["peer"] = run_peer(url, corpus, questions, opts)
    raw["wall_s"] = time.perf_counter() - started
    return build_result(raw, questions, opts, quick=quick, command=command, env=env)


def score(answers: list[dict[str, Any]], by_id: dict[str, Question]) -> list[bool]:
    return [realtimeqa.is_right(a["answer"], by_id[a["id"]].choices, by_id[a["id"]].answer) for a in answers]


def refused(a: dict[str, Any]) -> bool:
    return a.get("finish") == "not_found" or bool(REFUSAL.search(a["answer"]))


def variant_figures(rec: dict[str, Any], hits: dict[str, list[str]], by_id: dict[str, Question]) -> dict[str, Any]:
    e2e = rec["e2e"]
    right = score(e2e, by_id)
    shown = [a["id"] in a["cited"] for a in e2e]
    n = len(e2e)
    figs: dict[str, Any] = {
        "n": n,
        "e2e": sum(right) / n,
        "hit": sum(q in ids for q, ids in hits.items()) / n,
        "shown": sum(shown) / n,
        "right_given_shown": sum(r for r, s in zip(right, shown) if s) / max(1, sum(shown)),
        "oracle": sum(score(rec["oracle"], by_id)) / n,
        "false_refusal": sum(refused(a) for a in e2e) / n,
        "ttft_p50_ms": percentiles([a["ttft_ms"] for a in e2e])["p50"],
        "ttft_probe_p50_ms": percentiles(rec.get("ttft_probe_ms", []))["p50"] if rec.get("ttft_probe_ms") else None,
    }
    if "deleted" in rec:
        d = rec["deleted"]
        d_right = score(d, by_id)
        figs["deleted_refused"] = sum(refused(a) for a in d) / n
        figs["deleted_right"] = sum(d_right) / n
        figs["deleted_false_answer"] = sum(not refused(a) and not r for a, r in zip(d, d_right)) / n
    return figs


def build_result(raw: dict[str, Any], questions: Sequence[Question], opts: ReadingOptions, *, quick: bool, command: str,
                 env: dict[str, Any] | None = None) -> Result:  # fmt: skip
    by_id = {q.id: q for q in questions}
    n = len(questions)
    result = Result(suite="reading", title=f"Answer quality on real news (RealTimeQA {opts.period}, {n} questions)",
                    command=command, quick=quick, settings=opts.model_dump(), env=env or environment(), raw=raw)  # fmt: skip
    figures: dict[str, dict[str, Any]] = {}
    closed = None
    for group in raw["groups"]:
        if "closed_book" in group:
            closed = sum(score(group["closed_book"], by_id)) / n
        for name, rec in group["variants"].items():
            figures[name] = variant_figures(rec, group["hits"], by_id)
    peer = raw.get("peer") or {}
    peer_right = peer_hit = None
    if "answers" in peer:
        peer_right = sum(score(peer["answers"], by_id)) / n
        peer_hit = sum(a["id"] in a["retrieved"] for a in peer["answers"]) / n
    head_name = opts.variants[0].name
    head = figures[head_name]
    result.summary = {"headline": head_name, "closed_book": closed, "peer_e2e": peer_right, "peer_hit": peer_hit,
                      **{k: round(v, 4) if isinstance(v, float) else v for k, v in head.items()},
                      "variants": {k: {m: round(x, 4) if isinstance(x, float) else x for m, x in f.items()} for k, f in figures.items()}}  # fmt: skip

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f} ({round(x * n)}/{n})"

    result.tables.append(Table(f"Stages, {head_name} settings (k={opts.variants[0].k or 'server default'}; hit@{opts.hit_k})",
                               ["stage", "kfresh", f"LangChain chain ({peer.get('kind', 'skipped')})"], [
        ["closed-book (the model alone)", pct(closed), "-"],
        ["end to end", pct(head["e2e"]), pct(peer_right)],
        [f"evidence in the top {opts.hit_k} retrieved", pct(head["hit"]), pct(peer_hit)],
        ["evidence among the passages shown", pct(head["shown"]), "-"],
        ["right when the evidence was shown", f"{head['right_given_shown']:.3f}", "-"],
        ["evidence alone (oracle)", pct(head["oracle"]), "-"],
        ["false refusals (evidence present)", pct(head["false_refusal"]), "-"],
        ["evidence deleted: refused / false answer", f"{pct(head.get('deleted_refused'))} / {pct(head.get('deleted_false_answer'))}", "-"],
    ]))  # fmt: skip

    def share(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    rows = []
    for name, f in figures.items():
        rows.append([name, share(f["e2e"]), share(f["oracle"]), share(f["shown"]), share(f["right_given_shown"]), share(f["hit"]),
                     share(f["false_refusal"]), share(f.get("deleted_refused")), share(f.get("deleted_false_answer")),
                     "-" if not f["ttft_probe_p50_ms"] else round(f["ttft_probe_p50_ms"], 1)])  # fmt: skip
    result.tables.append(Table("Ablation: one lever per row (answers right as a share of the questions)",
                               ["variant", "end to end", "oracle", "evidence shown", "right given shown", f"hit@{opts.hit_k}",
                                "false refusal", "deleted: refused", "deleted: false answer", "TTFT p50 ms (unloaded)"], rows))  # fmt: skip
    levers = next((g["retrieval_levers"] for g in raw["groups"] if "retrieval_levers" in g), None)
    if levers and "skipped" not in levers:
        result.summary["retrieval_levers"] = levers
        result.tables.append(Table("Retrieval levers: the question's evidence among the top k (same questions, same passages)",
                                   ["retrieval", "hit@1", "hit@2", "hit@3", "hit@4"],
                                   [[name, *(f"{v:.3f}" for v in hits.values())] for name, hits in levers.items()]))  # fmt: skip
    result.notes += [
        f"{len(raw['groups'][0].get('hits', {}))} questions from {opts.period} ({'January-September' if opts.period == 'dev' else 'October-December' if opts.period == 'test' else 'all months'}); "
        "every evidence passage of the file (all periods) is a document, so the others are distractors.",
        "Right = the right choice appears in the answer and no other choice does (case- and punctuation-insensitive, whole words).",
        "One `vllm serve` (bf16, greedy) serves kfresh (remote backend) and the LangChain peer; answers run "
        f"{opts.concurrency} at a time, so bf16 batch effects apply equally to both.",
        "A refusal is kfresh's 'not in the documents' reply (finish_reason not_found) or a reply saying it does not know.",
        f"Whole run: {raw.get('wall_s', 0):.0f} s.",
    ]
    return result


def plot(result: Result, fig: Any) -> None:
    ax = fig.add_subplot(1, 1, 1)
    variants = result.summary["variants"]
    names = list(variants)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [variants[n]["e2e"] for n in names], 0.4, label="end to end")
    ax.bar([x + 0.2 for x in xs], [variants[n]["oracle"] for n in names], 0.4, label="evidence alone")
    if result.summary.get("peer_e2e") is not None:
        ax.axhline(result.summary["peer_e2e"], color="gray", linestyle="--", label="LangChain chain, end to end")
    ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("share right")
    ax.legend(fontsize=7, loc="lower left")
