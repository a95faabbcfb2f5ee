"""The chat example's figures, measured the way a person meets them (`make chatbot-measure`):

1. start: from launching run.py (its own kfresh server) to the first answer shown in a real browser,
   next to the server's own start time (goal: within it + 5 s);
2. change -> page: a document change, from its acknowledgement to the knowledge panel showing it with no
   reload (Date.now() in the page against the ack's time, one clock), then the next answer read back
   (goal: p95 <= 1 s and the new value answered);
3. load: 20 concurrent chat sessions through the web app (each with its knowledge stream open, asking in
   turn), next to the same questions sent straight to kfresh over gRPC in the same run, and the page's
   own latency meanwhile (goal: usable, no errors).
Writes benchmarks/results/chatbot-<date>.json and .md, and the screenshot in this folder.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
QUESTIONS = (
    "How much does the Halden 2 tent cost?",
    "When is the store open on Sunday?",
    "How many days do I have to return an item?",
    "Is delivery free?",
    "What colours does the rain jacket come in?",
)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": pct(values, 50), "p95": pct(values, 95), "max": max(values, default=float("nan"))}


class Launched:
    """run.py with its own kfresh server; the times it printed."""

    def __init__(self, data: Path) -> None:
        self.log = data / "run.log"
        self.t0 = time.perf_counter()
        with self.log.open("w") as out:
            self.proc = subprocess.Popen([sys.executable, str(HERE / "run.py"), "--port", "0", "--data", str(data)],
                                         stdout=out, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        deadline = time.monotonic() + 900
        self.seen: list[tuple[str, float]] = []
        while time.monotonic() < deadline and self.proc.poll() is None:
            text = self.log.read_text()
            for line in text.splitlines()[len(self.seen) :]:
                self.seen.append((line[:60], round(time.perf_counter() - self.t0, 2)))
            if url := re.search(r"open (http://\S+)", text):
                ready = re.search(r"kfresh ready at (\S+) in ([0-9.]+) s", text)
                assert ready, text
                self.url, self.addr, self.server_ready_s = url.group(1), ready.group(1), float(ready.group(2))
                self.url_s = time.perf_counter() - self.t0
                return
            time.sleep(0.05)
        raise RuntimeError("run.py did not serve:\n" + self.log.read_text())

    def phases(self) -> dict[str, float]:
        """Seconds from launch to each line run.py printed (its lines carry no times: the log's are read)."""
        return dict(self.seen)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=90)


def change_to_page(page: Any, addr: str, rounds: int) -> dict[str, Any]:
    from kfresh.client import KfreshClient, document

    lags, server_lags, answers = [], [], []
    with KfreshClient(addr) as kfresh:
        for i in range(rounds):
            price = 150 + i
            text = f"The Halden 2 tent, a light two-person tent, now costs {price} euros. The Halden 4 family tent sleeps four and costs 329 euros."
            doc = document("tent-prices", text, source="fernhill.example/catalogue/tents",
                           metadata={"title": "Tent prices", "section": "catalogue"})  # fmt: skip
            (ack,) = list(kfresh.ingest([doc], timeout=30))
            row = page.wait_knowledge("tent-prices", ack.version, timeout=30)
            acked_ms = ack.acked_at.ToMilliseconds()
            lags.append(row["shown_at_ms"] - acked_ms)
            server_lags.append(row["searchable_at_ms"] - acked_ms)
            if i % 4 == 3:
                shown = page.ask("How much does the Halden 2 tent cost?")
                answers.append({"price": price, "answered": str(price) in shown.text,
                                "cited": [list(c) for c in shown.citations]})  # fmt: skip
            time.sleep(0.3)
    return {"change_to_page_ms": summary(lags), "ack_to_searchable_ms": summary(server_lags),
            "next_answer_has_new_price": f"{sum(a['answered'] for a in answers)}/{len(answers)}", "answers": answers}  # fmt: skip


async def _sse_ask(http: Any, url: str, question: str) -> tuple[float, float, bool]:
    start = time.perf_counter()
    first, ok = float("nan"), False
    async with http.stream("POST", f"{url}api/ask", json={"question": question}) as response:
        async for line in response.aiter_lines():
            if line == "event: delta" and first != first:
                first = time.perf_counter() - start
            elif line == "event: done":
                ok = True
            elif line == "event: error":
                ok = False
    return first * 1000, (time.perf_counter() - start) * 1000, ok


async def _grpc_ask(client: Any, question: str) -> tuple[float, float, bool]:
    start, first = time.perf_counter(), float("nan")
    ok = False
    async for event in client.answer(question, timeout=300):
        if event.HasField("done"):
            ok = True
        elif first != first:
            first = time.perf_counter() - start
    return first * 1000, (time.perf_counter() - start) * 1000, ok


async def load(url: str, addr: str, sessions: int, turns: int) -> dict[str, Any]:
    import httpx

    from kfresh.client import AsyncKfreshClient

    async def run(ask: Any) -> dict[str, Any]:
        results: list[tuple[float, float, bool]] = []

        async def session(i: int) -> None:
            for t in range(turns):
                results.append(await ask(QUESTIONS[(i + t) % len(QUESTIONS)]))

        started = time.perf_counter()
        await asyncio.gather(*(session(i) for i in range(sessions)))
        wall = time.perf_counter() - started
        ok = [r for r in results if r[2]]
        return {"answers": len(results), "errors": len(results) - len(ok), "wall_s": wall,
                "first_words_ms": summary([r[0] for r in ok]), "whole_answer_ms": summary([r[1] for r in ok])}  # fmt: skip

    async with AsyncKfreshClient(addr) as client:
        direct = await run(lambda q: _grpc_ask(client, q))
    limits = httpx.Limits(max_connections=4 * sessions)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        streams = [asyncio.create_task(_hold_knowledge(http, url)) for _ in range(sessions)]
        probes: list[float] = []
        stop = asyncio.Event()

        async def probe() -> None:
            while not stop.is_set():
                t = time.perf_counter()
                page = await http.get(url)
                status = await http.get(f"{url}api/status")
                assert page.status_code == 200 and status.status_code == 200
                probes.append((time.perf_counter() - t) * 1000)
                await asyncio.sleep(0.5)

        prober = asyncio.create_task(probe())
        via_app = await run(lambda q: _sse_ask(http, url, q))
        stop.set()
        await prober
        for s in streams:
            s.cancel()
    return {"sessions": sessions, "turns": turns, "via_web_app": via_app, "direct_grpc": direct,
            "page_and_status_ms_under_load": summary(probes)}  # fmt: skip


async def _hold_knowledge(http: Any, url: str) -> None:
    async with http.stream("GET", f"{url}api/knowledge") as response:
        async for _ in response.aiter_lines():
            pass


def screenshot(page: Any, addr: str) -> None:
    from changes import STEPS, apply

    from kfresh.client import KfreshClient

    page.driver.refresh()
    page.wait_knowledge("tent-prices", 1)
    with KfreshClient(addr) as kfresh:
        page.ask("How many days do I have to return an item?")
        for step in STEPS:
            apply(kfresh, step)
    page.wait_knowledge("emberlite-stove", 2)
    page.ask("How many days do I have to return an item?")
    page.ask("How much does the Emberlite stove cost?")
    page.screenshot(HERE / "screenshot.png")


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"chatbot-{dt.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    s, c, ld = result["start"], result["change"], result["load"]
    fmt = lambda d: f"{d['p50']:.0f} / {d['p95']:.0f} / {d['max']:.0f}"  # noqa: E731
    lines = [
        f"# chat example ({result['date']})", "",
        f"`{result['command']}`; load average at start {result['loadavg']}; {result['machine']}.", "",
        "| what | figure | goal |", "|---|---|---|",
        f"| kfresh server start (process to model ready) | {s['server_ready_s']:.1f} s | - |",
        f"| launch to first answer in the browser | {s['first_answer_s']:.1f} s (server start + {s['over_server_s']:.1f} s) | server start + 5 s |",
        f"| change acknowledged -> shown in the page, p50 / p95 / max ({c['change_to_page_ms']['n']} changes) | {fmt(c['change_to_page_ms'])} ms | p95 <= 1000 ms |",
        f"| of which acknowledged -> searchable (server) | {fmt(c['ack_to_searchable_ms'])} ms | - |",
        f"| next answer has the new value | {c['next_answer_has_new_price']} | all |", "",
        f"Load: {ld['sessions']} concurrent chat sessions x {ld['turns']} questions, each with its knowledge stream open.", "",
        "| path | answers | errors | first words p50 / p95 / max (ms) | whole answer p50 / p95 / max (ms) | wall (s) |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, key in (("browser API (web app -> gRPC)", "via_web_app"), ("straight to kfresh (gRPC)", "direct_grpc")):
        r = ld[key]
        lines.append(
            f"| {name} | {r['answers']} | {r['errors']} | {fmt(r['first_words_ms'])} | {fmt(r['whole_answer_ms'])} | {r['wall_s']:.1f} |"
        )
    lines += ["", f"The page (GET / and /api/status) under that load: {fmt(ld['page_and_status_ms_under_load'])} ms "
              f"p50 / p95 / max over {ld['page_and_status_ms_under_load']['n']} probes."]  # fmt: skip
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=20, help="document changes timed to the page (default 20)")
    parser.add_argument("--sessions", type=int, default=20, help="concurrent chat sessions (default 20)")
    parser.add_argument("--turns", type=int, default=3, help="questions per session (default 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from browser import ChatPage

    result: dict[str, Any] = {"date": dt.date.today().isoformat(), "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
                              "machine": f"{os.cpu_count()} cores, no GPU", "command": "make chatbot-measure"}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kfresh-chatbot-") as tmp, ChatPage(None) as page:
        app = Launched(Path(tmp))  # the person's browser is open already: its start is not the chat's
        try:
            page.open(app.url)
            page.ask(QUESTIONS[0])
            first_answer_s = time.perf_counter() - app.t0
            result["start"] = {"server_ready_s": app.server_ready_s, "url_s": app.url_s, "phases": app.phases(),
                               "first_answer_s": first_answer_s, "over_server_s": first_answer_s - app.server_ready_s}  # fmt: skip
            print("start:", result["start"], flush=True)
            result["change"] = change_to_page(page, app.addr, args.changes)
            print("change:", result["change"]["change_to_page_ms"], flush=True)
            result["load"] = asyncio.run(load(app.url, app.addr, args.sessions, args.turns))
            write(result, args.out)
            screenshot(page, app.addr)
        finally:
            app.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
