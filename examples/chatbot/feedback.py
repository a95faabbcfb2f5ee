"""Answers and their thumbs up/down, kept in a small SQLite file beside the web app.

Each answer the page shows is recorded (question, answer text, citations with versions, time); a vote
updates its row. `python run.py --feedback` prints them, so a person can see what customers disliked and
which document versions those answers read.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers(
    answer_id TEXT PRIMARY KEY,
    asked_at REAL NOT NULL,
    question TEXT NOT NULL,
    answer TEXT NOT NULL,
    details TEXT NOT NULL,
    vote TEXT CHECK(vote IN ('up', 'down')),
    voted_at REAL
);
"""


class FeedbackStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def record(self, answer_id: str, question: str, answer: str, details: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO answers(answer_id, asked_at, question, answer, details) VALUES(?,?,?,?,?)",
                (answer_id, time.time(), question, answer, json.dumps(details, ensure_ascii=False)),
            )

    def vote(self, answer_id: str, vote: str) -> bool:
        """Set the answer's vote (the last one counts); False when the answer is unknown."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE answers SET vote=?, voted_at=? WHERE answer_id=?", (vote, time.time(), answer_id)
            )
            return cur.rowcount == 1

    def rows(self, *, only_votes: bool = False) -> list[dict[str, Any]]:
        where = " WHERE vote IS NOT NULL" if only_votes else ""
        with self._lock:
            got = self._db.execute(
                f"SELECT answer_id, asked_at, question, answer, details, vote FROM answers{where} ORDER BY asked_at"
            ).fetchall()
        return [
            {"answer_id": r[0], "asked_at": r[1], "question": r[2], "answer": r[3], "details": json.loads(r[4]),
             "vote": r[5]}
            for r in got
        ]  # fmt: skip

    def close(self) -> None:
        with self._lock:
            self._db.close()
