"""index.kind=auto: exact search while the corpus is small, an IVF index past `auto_min` vectors, retrained as
the corpus grows or drifts, its probe count chosen to hold `auto_recall`.

Below `auto_min` vectors it is the flat index (exact). Then, and again whenever the corpus has grown 4x since
the last training or has drifted away from its centroids, the worker's maintenance turn trains a new IVFFlat
(about 4 sqrt(n) lists) on a sample, adds every vector to it and picks nprobe; it picks nprobe again each time
the corpus has doubled since.
Drift is measured on every add at the cost of one centroid lookup per vector: the residual 1 - cosine to the
nearest centroid of the vectors added since training, against that of the training vectors. New topics land far
from every centroid and crowd the lists they fall into, which costs recall at the same nprobe; when the added
vectors' mean residual exceeds the trained one by `_DRIFT_RATIO` (over at least a tenth of the trained size), it
retrains. After a restart from a snapshot the first vectors added set the reference instead.
nprobe is measured where it can be: with at least 64 recent real queries (`query_source`, the server's query
cache), the smallest power of two whose recall@10 against an exact search of the same index (every list
probed) reaches `auto_recall` on them. Without them it is a sixteenth of the lists: stored vectors as queries,
even with noise added, sit inside their own cluster and overstate recall badly (measured at 100k real MiniLM
vectors: that proxy chose 2 probes of 1,264 for 0.98, real questions got 0.76; a sixteenth, 79, gives ~0.96).
The slow part runs off the index lock (IvfIndex's maintenance split), so searches go on; the swap is atomic.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from kfresh.indexer.vectors.ivf import _MAX_POINTS_PER_LIST, _MIN_POINTS_PER_LIST, IvfIndex

log = logging.getLogger("kfresh.indexer")

_K = 10
_MIN_QUERIES = 64  # real queries needed to measure recall instead of using the share rule
_SHARE = 16  # without them: probe nlist / _SHARE lists
_DRIFT_RATIO = 1.25  # added vectors' mean residual over the trained one that triggers retraining
_DRIFT_MIN = 1_000  # and at least this many added vectors (and a tenth of the trained size)
_FIT_SAMPLE = 10_000  # training vectors whose residual sets the reference


class AutoIndex(IvfIndex):
    kind = "auto"

    def __init__(self, dim: int, *, auto_min: int, recall: float) -> None:
        super().__init__(dim, nlist=1, nprobe=1, train_min=auto_min)
        self.recall_target = recall
        self.trained_at = 0  # vectors when the IVF was last trained
        self.tuned_at = 0  # vectors when nprobe was last chosen
        self.measured_recall: float | None = None  # None: nprobe came from the share rule
        self.fit_reference: float | None = None  # mean residual (1 - cosine to the nearest centroid) when trained
        self._fit_sum, self._fit_n = 0.0, 0  # the same over the vectors added since
        # Recent real query vectors (n, dim), e.g. the server's query cache; set by the owner of the index.
        self.query_source: Callable[[], np.ndarray] | None = None

    def describe(self) -> str:
        text = super().describe()
        if self._ivf is None:
            return text
        how = (
            f"recall@10 {self.measured_recall:.3f} on recent queries"
            if self.measured_recall is not None
            else "1/16 of the lists"
        )
        drift = f", drift {self.drift():.2f}x over {self._fit_n:,} added" if self._fit_n else ""
        return f"{text} ({how}{drift})"

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        super().add(ids, vecs)
        if self._ivf is not None and len(ids):
            residual = self._residuals(self._ivf, np.asarray(vecs, dtype=np.float32).reshape(-1, self.dim))
            self._fit_sum, self._fit_n = self._fit_sum + float(residual.sum()), self._fit_n + len(residual)
            if self.fit_reference is None and self._fit_n >= _DRIFT_MIN:  # restored from a snapshot: start here
                self.fit_reference = self._fit_sum / self._fit_n
                self._fit_sum, self._fit_n = 0.0, 0

    def drift(self) -> float:
        """The added vectors' mean residual over the trained one (1.0 = they fit the centroids as well)."""
        if not self._fit_n or not self.fit_reference:
            return 1.0
        return (self._fit_sum / self._fit_n) / self.fit_reference

    def drifted(self) -> bool:
        return self._fit_n >= max(_DRIFT_MIN, self.trained_at // 10) and self.drift() >= _DRIFT_RATIO

    @staticmethod
    def _residuals(ivf: Any, vecs: np.ndarray) -> np.ndarray:
        sims, _ = ivf.quantizer.search(np.ascontiguousarray(vecs), 1)
        return np.asarray(1.0 - sims[:, 0], dtype=np.float64)

    def use_queries(self, source: Callable[[], np.ndarray]) -> None:
        self.query_source = source

    def needs_maintenance(self) -> bool:
        n = self.ntotal
        if self._ivf is None:
            return n >= self.train_min
        return n >= 4 * max(self.trained_at, 1) or n >= 2 * max(self.tuned_at, 1) or self.drifted()

    def prepare_maintenance(self) -> Any:
        """A new trained and filled IVF with its nprobe (train), or a new nprobe for the current one (tune)."""
        import faiss

        ids, vecs = self._vectors()
        n = len(ids)
        if self._ivf is not None and n < 4 * max(self.trained_at, 1) and not self.drifted():
            nprobe, recall = self._choose_nprobe(self._ivf, vecs, ids)
            return ("tune", n, nprobe, recall)
        nlist = int(min(max(16, 4 * math.sqrt(n)), max(1, n // _MIN_POINTS_PER_LIST), 65_536))
        rng = np.random.default_rng(0)
        sample = (
            vecs
            if n <= nlist * _MAX_POINTS_PER_LIST
            else vecs[rng.choice(n, nlist * _MAX_POINTS_PER_LIST, replace=False)]
        )
        ivf: Any = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(np.ascontiguousarray(sample))
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
        ivf.add_with_ids(vecs, ids)
        nprobe, recall = self._choose_nprobe(ivf, vecs, ids)
        fit = float(self._residuals(ivf, sample[:_FIT_SAMPLE]).mean())
        log.info("auto.trained vectors=%d nlist=%d nprobe=%d recall@10=%s drift=%.2f", n, nlist, nprobe, recall,
                 self.drift())  # fmt: skip
        return ("train", n, nprobe, recall, ivf, ids, fit)

    def apply_maintenance(self, prepared: Any) -> None:
        if prepared is None:
            return
        if prepared[0] == "tune":
            _, n, nprobe, recall = prepared
            if self._ivf is not None:
                self._ivf.nprobe = nprobe
            self.tuned_at, self.measured_recall = n, recall
            log.info("auto.tuned vectors=%d nprobe=%d recall@10=%s", n, nprobe, recall)
            return
        _, n, nprobe, recall, ivf, ids, fit = prepared
        # Only this worker writes, and it ran prepare_maintenance itself: nothing was added or removed since.
        assert len(ids) == self.ntotal, "the index changed during maintenance"
        ivf.nprobe = nprobe
        self._ivf, self._flat = ivf, None
        self.trained_at = self.tuned_at = n
        self.measured_recall = recall
        self.fit_reference, self._fit_sum, self._fit_n = fit, 0.0, 0

    def _vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (id, vector): the flat index's, or those in the IVF's inverted lists."""
        import faiss

        if self._ivf is None:
            assert self._flat is not None
            return self._flat.export()
        lists = self._ivf.invlists
        ids_parts, vec_parts = [], []
        for list_no in range(self._ivf.nlist):
            size = lists.list_size(list_no)
            if not size:
                continue
            ids_parts.append(faiss.rev_swig_ptr(lists.get_ids(list_no), size).copy())
            codes = faiss.rev_swig_ptr(lists.get_codes(list_no), size * self._ivf.code_size).copy()
            vec_parts.append(codes.view(np.float32).reshape(size, self.dim))
        if not ids_parts:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(ids_parts).astype(np.int64), np.ascontiguousarray(np.concatenate(vec_parts))

    def _choose_nprobe(self, ivf: Any, vecs: np.ndarray, ids: np.ndarray) -> tuple[int, float | None]:
        """(nprobe, its measured recall@10 or None): the smallest power of two reaching the target on recent real
        queries, or the share rule when there are too few of them."""
        queries = self.query_source() if self.query_source is not None else None
        if queries is None or len(queries) < _MIN_QUERIES:
            return max(1, math.ceil(ivf.nlist / _SHARE)), None
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        ivf.nprobe = ivf.nlist
        _, exact = ivf.search(queries, _K)
        nprobe = 1
        while True:
            ivf.nprobe = nprobe
            _, got = ivf.search(queries, _K)
            recall = float(np.mean([len(set(a.tolist()) & set(b.tolist()) - {-1}) / max(1, int((b >= 0).sum()))
                                    for a, b in zip(got, exact)]))  # fmt: skip
            if recall >= self.recall_target or nprobe >= ivf.nlist:
                return nprobe, recall
            nprobe = min(ivf.nlist, nprobe * 2)

    @classmethod
    def restore(cls, data: bytes | memoryview, dim: int, *, auto_min: int, recall: float) -> AutoIndex:
        """From to_bytes() (IvfIndex's format); a trained IVF keeps the nprobe it was tuned to (FAISS stores it)."""
        index = cls(dim, auto_min=auto_min, recall=recall)
        index._load(data)
        if index._ivf is not None:
            index.trained_at = index.tuned_at = index.ntotal
        return index
