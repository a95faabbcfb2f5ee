"""newest_wins: corrections answered with the newest value, by how the correction reaches the index.

A fictional news story and, a day later, a story that changes its fact (benchmarks/data/corrections.jsonl: 10
pairs written with the reading step in view, "here", and 12 written blind to it by a separate session, "blind").
Each pair goes in three ways, each under its own metadata so that the ways never meet in one search:
- upsert: the correction is a new version of the same document;
- supersedes: the correction is a separate document whose `supersedes` names the story;
- separate: a separate document with no link, worded as its newsroom wrote it (the hard case of issue 18).
Every story's question is asked through Answer (default settings, greedy). Right = the corrected value is in
the reply, the model's own words do not give the old value instead, and the correction is cited. The ceiling
is the correction alone (a filter on its id); "old read" counts replies that cited the old story.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from kfresh.benchmarks.common import SuiteOptions, environment
from kfresh.benchmarks.report import Result, Table, grouped_bars

DATA = Path(__file__).parent / "data" / "corrections.jsonl"
DAY1, DAY = 1_790_000_000.0, 86_400.0
WAYS = ("upsert", "supersedes", "separate")


@dataclass(frozen=True)
class Pair:
    set: str
    question: str
    first: str
    correction: str
    new: str
    old: str | None


class NewestWinsOptions(SuiteOptions):
    sets: list[str] = Field(default_factory=lambda: ["here", "blind"], description="Which pairs (here, blind).")
    per_set: int = Field(0, ge=0, description="Pairs per set (0 = all).")
    max_tokens: int = Field(64, ge=1, description="Tokens per answer (greedy).")
    concurrency: int = Field(4, ge=1, le=64, description="Answers in flight at once.")
    generator: str = Field("", description="Generator folder to serve (e.g. the reader); empty = the configured one.")
    settings: dict[str, Any] = Field(
        default_factory=dict, description='Server settings (dotted keys), e.g. {"answer.prompt_passages": 0}.'
    )

    @classmethod
    def quick(cls) -> NewestWinsOptions:
        return cls(sets=["here"], per_set=2, max_tokens=32)


def load_pairs() -> list[Pair]:
    """Every pair of benchmarks/data/corrections.jsonl, in file order."""
    return [Pair(**json.loads(line)) for line in DATA.read_text().splitlines() if line.strip()]


def load(opts: NewestWinsOptions) -> list[Pair]:
    pairs = load_pairs()
    out: list[Pair] = []
    for name in opts.sets:
        chosen = [p for p in pairs if p.set == name]
        out += chosen[: opts.per_set] if opts.per_set else chosen
    return out


def _ids(way: str, i: int) -> tuple[str, str]:
    """(the story's id, the correction's id): one document for an upsert."""
    return f"{way}-{i}", f"{way}-{i}" if way == "upsert" else f"{way}-{i}-fix"


def _docs(pairs: list[Pair]) -> tuple[list[Any], list[Any]]:
    """(day-1 documents, day-2 documents) for every pair in every way."""
    from kfresh.client import document

    first, second = [], []
    for i, p in enumerate(pairs):
        for way in WAYS:
            story, fix = _ids(way, i)
            meta = {"way": way, "pair": str(i)}
            first.append(document(story, p.first, source="day1", valid_from=DAY1, metadata={**meta, "role": "story"}))
            second.append(document(fix, p.correction, source="day2", valid_from=DAY1 + DAY,
                                   metadata={**meta, "role": "fix"},
                                   supersedes=[story] if way == "supersedes" else []))  # fmt: skip
    return first, second


def judge(p: Pair, reply: str, cited: list[str], story: str, fix: str) -> dict[str, Any]:
    own = reply.split('[1] "')[0]  # the model's own words, before the verbatim quote
    said_old = p.old is not None and p.old in own and p.new not in own
    read_fix = fix in cited
    read_old = story != fix and story in cited
    return {"right": p.new in reply and not said_old and read_fix, "read_fix": read_fix, "read_old": read_old,
            "said_old": said_old, "reply": reply, "cited": cited}  # fmt: skip


async def ask(addr: str, pairs: list[Pair], opts: NewestWinsOptions) -> dict[str, list[dict[str, Any]]]:
    """Every pair's question in every way, and over the correction alone (the ceiling)."""
    from kfresh.testing.servers import aclient

    slots = asyncio.Semaphore(opts.concurrency)

    async def one(c: Any, i: int, p: Pair, way: str) -> dict[str, Any]:
        if way == "ceiling":
            (story, fix), where = _ids("separate", i), {"way": "separate", "pair": str(i), "role": "fix"}
        else:
            (story, fix), where = _ids(way, i), {"way": way}
        text, cited = [], []
        async with slots:
            async for event in c.answer(p.question, max_tokens=opts.max_tokens, temperature=0.0, filter=where,
                                        timeout=600):  # fmt: skip
                if event.HasField("done"):
                    cited = [x.doc_id for x in event.done.citations]
                else:
                    text.append(event.delta)
        return {"pair": i, "set": p.set, **judge(p, "".join(text), cited, story, fix)}

    async with aclient(addr) as c:
        return {way: list(await asyncio.gather(*(one(c, i, p, way) for i, p in enumerate(pairs))))
                for way in (*WAYS, "ceiling")}  # fmt: skip


def run(opts: NewestWinsOptions, *, addr: str | None = None, quick: bool = False, command: str = "") -> Result:
    from kfresh.core.config import KfreshConfig
    from kfresh.models import generator_path
    from kfresh.testing.servers import client, kfresh_server, vllm_serve

    if addr:
        raise SystemExit("kfresh bench newest_wins starts its own server (its documents would mix with yours)")
    cfg = KfreshConfig()
    pairs = load(opts)
    env = environment(model="SmolLM2-135M-Instruct", dtype=cfg.generation.dtype)
    started = time.perf_counter()
    with vllm_serve(opts.generator or generator_path(cfg.models), dtype=cfg.generation.dtype) as url:
        remote = {"generation.backend": "remote", "generation.remote_url": url, "generation.remote_timeout_s": 600}
        with kfresh_server({**remote, **opts.settings}, model=True) as target:
            first, second = _docs(pairs)
            with client(target.addr) as c:
                for docs in (first, second):  # the stories, then (a day later) their corrections
                    list(c.ingest(docs, timeout=120))
                    if not c.wait_searchable(120).searchable:
                        raise TimeoutError("the stories were not searchable after 120 s")
            answers = asyncio.run(ask(target.addr, pairs, opts))
    raw = {"pairs": [vars(p) for p in pairs], "answers": answers, "wall_s": time.perf_counter() - started}
    return build_result(raw, opts, quick=quick, command=command, env=env)


def build_result(raw: dict[str, Any], opts: NewestWinsOptions, *, quick: bool, command: str,
                 env: dict[str, Any]) -> Result:  # fmt: skip
    result = Result(suite="newest_wins", title="Newest wins: corrections answered with the newest value",
                    command=command, quick=quick, settings=opts.model_dump(), env=env, raw=raw)  # fmt: skip
    rows = []
    for way in (*WAYS, "ceiling"):
        row: list[Any] = [way]
        for name in opts.sets:
            got = [a for a in raw["answers"][way] if a["set"] == name]
            right, old = sum(a["right"] for a in got), sum(a["read_old"] for a in got)
            row += [f"{right}/{len(got)}", f"{old}/{len(got)}"]
            result.summary[f"{way}_{name}_right"] = right / len(got) if got else None
        rows.append(row)
    header = ["how the correction arrives"]
    for name in opts.sets:
        header += [f"right ({name})", f"old story read ({name})"]
    result.tables.append(Table("Right = the corrected value in the reply, not the old one in the model's words, "
                               f"the correction cited; {_settings_said(opts)}, greedy", header, rows))  # fmt: skip
    result.tables.append(Table("Every reply", ["way", "set", "pair", "right", "reply", "cited"], [
        [way, a["set"], a["pair"], a["right"], a["reply"].replace("\n", " ")[:160], ", ".join(a["cited"])]
        for way in (*WAYS, "ceiling") for a in raw["answers"][way]
    ]))  # fmt: skip
    result.notes += [
        "here: 10 pairs written in this project with the reading step in view; blind: 12 pairs written by a "
        "separate session that saw none of the code, asked for varied newsroom wording.",
        "Each way's documents carry their own metadata and every question is asked with a filter on it, so the "
        "ways never meet in one search; the other pairs of the same way are the distractors.",
        "ceiling: the correction's document alone (a filter on its id's metadata), the model's reading of it.",
    ]
    return result


def plot(result: Result, fig: Any) -> None:
    ax = fig.add_subplot(1, 1, 1)
    sets = result.settings["sets"]
    ways = [*WAYS, "ceiling"]
    grouped_bars(ax, ways, [(name, [result.summary.get(f"{way}_{name}_right") or 0.0 for way in ways])
                            for name in sets])  # fmt: skip
    ax.set_ylabel("answered with the newest value")
    ax.set_ylim(0, 1)


def _settings_said(opts: NewestWinsOptions) -> str:
    said = [f"generator {opts.generator}"] if opts.generator else []
    said += [f"{k}={v}" for k, v in opts.settings.items()]
    return ", ".join(said) if said else "default answer settings"
