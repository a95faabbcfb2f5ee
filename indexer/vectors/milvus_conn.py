"""Connecting to Milvus for the milvus vector backend: the client, the collection, milvus-lite's lifetime.

Kept apart from milvus.py so the index itself reads as the VectorIndex contract and nothing else.
A local URI (a path ending in .db) is embedded milvus-lite: pymilvus starts an in-process server for the
file on first use and keeps it until the process exits. We count the MilvusIndex objects per file and stop
that server when the last one closes, so an Indexer restart in the same process reopens the file (and its
write-ahead log) for real, and test suites do not pile up one server per temporary file.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kfresh.core.config import IndexConfig
from kfresh.core.errors import Unavailable

log = logging.getLogger("kfresh.indexer")

ID_FIELD, VEC_FIELD = "id", "vec"
INSTALL_HINT = "pip install pymilvus==3.0.2 milvus-lite==3.2.2 (the versions pinned in requirements.txt)"

_local_lock = threading.Lock()
_local_users: dict[str, int] = {}


def is_local(uri: str) -> bool:
    """A milvus-lite file rather than a server URL."""
    return "://" not in uri and uri.endswith(".db")


def same_uri(a: str, b: str) -> bool:
    """Equal as Milvus addresses: local paths compare absolute, URLs without a trailing slash."""
    if is_local(a) and is_local(b):
        return os.path.abspath(a) == os.path.abspath(b)
    return a.rstrip("/") == b.rstrip("/")


def import_pymilvus() -> Any:
    """The pymilvus module, or Unavailable saying how to install it."""
    try:
        import pymilvus
    except ImportError as exc:
        raise Unavailable(f"index.kind='milvus' needs pymilvus ({exc}); {INSTALL_HINT}") from exc
    return pymilvus


@contextmanager
def unavailable_on_failure(uri: str, what: str) -> Iterator[None]:
    """A failed Milvus call (server down, timeout) becomes kfresh's Unavailable (gRPC UNAVAILABLE), not INTERNAL."""
    import grpc
    from pymilvus import MilvusException

    try:
        yield
    except (MilvusException, grpc.RpcError) as exc:
        raise Unavailable(f"Milvus at {uri} could not {what}: {exc}") from exc


def connect(cfg: IndexConfig) -> Any:
    """A MilvusClient for cfg.milvus_uri; for a local file also takes a reference on its milvus-lite server."""
    pymilvus = import_pymilvus()
    uri, token = cfg.milvus_uri, cfg.milvus_token.get_secret_value()
    local = is_local(uri)
    if local:
        try:
            import milvus_lite  # noqa: F401 - pymilvus would say the same less clearly
        except ImportError as exc:
            raise Unavailable(f"index.milvus_uri={uri!r} is a milvus-lite file but {exc}; {INSTALL_HINT}") from exc
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    try:
        client = pymilvus.MilvusClient(uri=uri, token=token, timeout=cfg.milvus_timeout_s)
    except pymilvus.MilvusException as exc:
        why = " (milvus-lite opens a file in one process only; several processes need a Milvus server)" if local else ""
        raise Unavailable(f"cannot connect to Milvus at index.milvus_uri={uri!r}: {exc}{why}") from exc
    if local:
        with _local_lock:
            key = os.path.abspath(uri)
            _local_users[key] = _local_users.get(key, 0) + 1
    return client


def disconnect(client: Any, uri: str) -> None:
    """Close the client; stop the milvus-lite server of a local file when its last user goes."""
    client.close()
    if not is_local(uri):
        return
    key = os.path.abspath(uri)
    with _local_lock:
        left = _local_users.get(key, 0) - 1
        if left > 0:
            _local_users[key] = left
            return
        _local_users.pop(key, None)
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(uri)


def ensure_collection(client: Any, cfg: IndexConfig, dim: int, *, create: bool) -> str:
    """Open (or create) the collection, check it fits, load it; returns the index type it really has."""
    name = cfg.milvus_collection
    if not client.has_collection(name):
        if not create:
            raise ValueError(f"Milvus collection {name!r} does not exist at {cfg.milvus_uri}")
        _create(client, cfg, dim)
    check_schema(client.describe_collection(name), name, dim)
    if VEC_FIELD not in client.list_indexes(name):  # new, or its creator died before indexing it
        _create_index(client, cfg)
    client.load_collection(name)
    index_type = str(client.describe_index(name, VEC_FIELD).get("index_type", cfg.milvus_index_type))
    if index_type != cfg.milvus_index_type:
        log.warning("milvus.index_type collection=%s has=%s configured=%s: using %s",
                    name, index_type, cfg.milvus_index_type, index_type)  # fmt: skip
    return index_type


def _create(client: Any, cfg: IndexConfig, dim: int) -> None:
    from pymilvus import DataType, MilvusException

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field(ID_FIELD, DataType.INT64, is_primary=True)
    schema.add_field(VEC_FIELD, DataType.FLOAT_VECTOR, dim=dim)
    try:
        client.create_collection(cfg.milvus_collection, schema=schema, consistency_level="Strong")
    except MilvusException:
        if not client.has_collection(cfg.milvus_collection):  # not a replica that created it first
            raise
        return
    log.info("milvus.collection_created uri=%s collection=%s dim=%d index=%s",
             cfg.milvus_uri, cfg.milvus_collection, dim, cfg.milvus_index_type)  # fmt: skip


def _create_index(client: Any, cfg: IndexConfig) -> None:
    """Not create_collection(index_params=...): that waits on AllocTimestamp, which milvus-lite lacks (it logs
    a server-side traceback). The index is created on an empty or unloaded collection: nothing to wait for."""
    params = client.prepare_index_params()
    params.add_index(field_name=VEC_FIELD, index_type=cfg.milvus_index_type, metric_type="IP", params=build_params(cfg))
    client.create_index(cfg.milvus_collection, params, sync=False)


def check_schema(desc: dict, name: str, dim: int) -> None:
    """ValueError unless the collection has an INT64 primary key `id` and a FLOAT_VECTOR(dim) `vec`."""
    from pymilvus import DataType

    fields = {f["name"]: f for f in desc.get("fields", [])}
    pk, vec = fields.get(ID_FIELD), fields.get(VEC_FIELD)
    ok = (pk is not None and pk.get("is_primary") and pk["type"] == DataType.INT64
          and vec is not None and vec["type"] == DataType.FLOAT_VECTOR)  # fmt: skip
    if not ok:
        raise ValueError(f"Milvus collection {name!r} was not made by kfresh (needs INT64 primary key "
                         f"{ID_FIELD!r} and FLOAT_VECTOR {VEC_FIELD!r}); set index.milvus_collection to another name")  # fmt: skip
    found = int(vec["params"].get("dim", -1))  # type: ignore[index]  # vec is checked above
    if found != dim:
        raise ValueError(f"Milvus collection {name!r} holds {found}-dimensional vectors but the embedder makes {dim}; "
                         "set index.milvus_collection to a new name for this embedder")  # fmt: skip


def build_params(cfg: IndexConfig) -> dict[str, Any]:
    """Index build parameters for cfg.milvus_index_type."""
    if cfg.milvus_index_type == "IVF_FLAT":
        return {"nlist": cfg.milvus_nlist}
    if cfg.milvus_index_type == "HNSW":
        return {"M": cfg.milvus_hnsw_m, "efConstruction": max(200, cfg.milvus_hnsw_ef)}
    return {}


def search_params(cfg: IndexConfig, index_type: str, k: int) -> dict[str, Any]:
    """Per-search parameters for the collection's index type (AUTOINDEX: the server's own choice)."""
    if index_type == "IVF_FLAT":
        return {"nprobe": cfg.milvus_nprobe}
    if index_type == "HNSW":
        return {"ef": max(cfg.milvus_hnsw_ef, k)}
    return {}
