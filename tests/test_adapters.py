"""Serving LoRA adapters: registry -> AdapterManager -> backend, hot swap, rollback, the CPU LoRA bug fix.

The fast tests drive AdapterManager against a recording backend; the slow ones use real peft adapters
on the real model with the session's vLLM engine (float32), a real gRPC server and `vllm serve`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from adapter_helper import AnswerLoad
from server_helper import ServerHandle, server_config
from server_helper import answer_once as _answer

from kfresh.client import KfreshClient, document
from kfresh.core.config import GenerationConfig
from kfresh.core.errors import InvalidInput, NotFound
from kfresh.finetuner.registry import AdapterManifest, AdapterRegistry
from kfresh.server.adapters import AdapterManager
from kfresh.server.generation.base import GenerationBackend, GenerationChunk, GenerationRequest

FIGURES: dict[str, float] = {}


# -- helpers -------------------------------------------------------------------------------------
class RecordingBackend(GenerationBackend):
    """Just enough of a backend to watch what the manager loads and unloads."""

    name = "recording"

    def __init__(self) -> None:
        self.loaded: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []

    @property
    def model(self) -> str:
        return "recording"

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        yield GenerationChunk("", True, "stop")

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> bool:
        return True

    async def load_adapter(self, name: str, path: str) -> None:
        self.calls.append(("load", name))
        self.loaded[name] = path

    async def unload_adapter(self, name: str) -> None:
        self.calls.append(("unload", name))
        del self.loaded[name]


def _fake_adapter(tmp: Path, name: str) -> Path:
    folder = tmp / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(name.encode() * 64)
    return folder


def _publish(registry: AdapterRegistry, folder: Path, *, promote: bool = True) -> AdapterManifest:
    return registry.publish(
        folder, base_model="SmolLM2-135M-Instruct", base_model_sha256="b", training_data_sha256="d",
        gate_passed=True, metrics={"recall": 0.9}, facts=2, promote=promote,
    )  # fmt: skip


def _tamper(registry: AdapterRegistry, version: str) -> None:
    weights = registry.adapter_dir(version) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0")


def _point_at(registry: AdapterRegistry, version: str, previous: list[str]) -> None:
    """Write CURRENT.json as another process would (no verification: the server must verify)."""
    (registry.root / "CURRENT.json").write_text(
        json.dumps({"version": version, "previous": previous, "updated_at": time.time()})
    )


@pytest.fixture()
def fake_registry(tmp_path: Path) -> AdapterRegistry:
    registry = AdapterRegistry(tmp_path / "registry")
    for name in ("a", "b", "c"):
        _publish(registry, _fake_adapter(tmp_path, name))
    return registry  # v0001, v0002, v0003 published; v0003 current, previous [v0001, v0002]


# -- AdapterManager against a recording backend -----------------------------------------------------
def test_sync_serves_current_keeps_previous_loaded_and_resolves(fake_registry: AdapterRegistry) -> None:
    backend = RecordingBackend()
    manager = AdapterManager(fake_registry, backend)

    async def scenario() -> None:
        assert await manager.sync() == "v0003"
        await asyncio.sleep(0.05)  # the rollback target loads in the background
        assert set(backend.loaded) == {"kfresh-v0003", "kfresh-v0002"} and manager.standby_version == "v0002"
        assert backend.loaded["kfresh-v0003"] == str(fake_registry.adapter_dir("v0003"))
        assert await manager.resolve("") == "kfresh-v0003"
        assert await manager.resolve("none") is None
        assert await manager.resolve("v0001") == "kfresh-v0001"  # loaded on demand
        assert await manager.resolve("kfresh-v0002") == "kfresh-v0002"
        with pytest.raises(NotFound):
            await manager.resolve("v0042")
        with pytest.raises(InvalidInput):
            await manager.resolve("../../etc")
        await manager.close()
        assert backend.loaded == {}

    asyncio.run(scenario())


def test_in_flight_request_keeps_its_adapter_through_a_rollback(fake_registry: AdapterRegistry) -> None:
    backend = RecordingBackend()
    manager = AdapterManager(fake_registry, backend)

    async def scenario() -> None:
        await manager.sync()
        async with manager.use("") as held:
            assert held.version == "v0003"
            change = await manager.rollback()
            assert (change.current, change.previous) == ("v0002", "v0003")
            assert (await manager.resolve("")) == "kfresh-v0002"  # new requests switch at once
            await asyncio.sleep(0.05)
            assert "kfresh-v0003" in backend.loaded, "unloaded under an in-flight request"
        await asyncio.sleep(0.05)
        assert "kfresh-v0003" not in backend.loaded  # freed once the request ended
        assert fake_registry.pointer()["version"] == "v0002"
        await manager.close()

    asyncio.run(scenario())


def test_tampered_adapter_is_refused_and_serving_continues(
    fake_registry: AdapterRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = RecordingBackend()
    manager = AdapterManager(fake_registry, backend)
    bad = _publish(fake_registry, _fake_adapter(tmp_path, "d"), promote=False).version
    _tamper(fake_registry, bad)

    async def scenario() -> None:
        await manager.sync()
        with pytest.raises(InvalidInput, match="sha256"):
            await manager.promote(bad)
        with pytest.raises(InvalidInput, match="sha256"):
            await manager.resolve(bad)
        _point_at(fake_registry, bad, ["v0003"])
        with caplog.at_level(logging.ERROR, logger="kfresh.adapters"):
            assert await manager.sync() == "v0003"
        assert f"adapter_refused version={bad}" in caplog.text
        assert f"kfresh-{bad}" not in backend.loaded
        await manager.close()

    asyncio.run(scenario())


def test_watcher_picks_up_a_version_published_elsewhere(fake_registry: AdapterRegistry, tmp_path: Path) -> None:
    backend = RecordingBackend()
    manager = AdapterManager(fake_registry, backend, poll_interval_s=0.02)

    async def scenario() -> float:
        await manager.sync()
        manager.start_watcher()
        published = _publish(AdapterRegistry(fake_registry.root), _fake_adapter(tmp_path, "e"))  # "another process"
        start = time.perf_counter()
        while manager.current_version != published.version:
            assert time.perf_counter() - start < 5, "the watcher never picked up the new version"
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - start
        assert backend.loaded[published.served_name] == str(fake_registry.adapter_dir(published.version))
        await manager.close()
        return elapsed

    assert asyncio.run(scenario()) < 5


def test_rollback_with_nothing_served_is_invalid(tmp_path: Path) -> None:
    manager = AdapterManager(AdapterRegistry(tmp_path / "empty"), RecordingBackend())

    async def scenario() -> None:
        assert await manager.sync() == ""
        assert await manager.resolve("") is None
        with pytest.raises(InvalidInput, match="nothing to roll back"):
            await manager.rollback()

    asyncio.run(scenario())


def test_citations_are_recorded(tmp_path: Path) -> None:
    from kfresh.indexer.stores.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "kfresh.db")
    try:
        assert store.record_citations([("a", 1), ("b", 2), ("a", 1)], now=100.0) == 3
        store.record_citations([("a", 2)], now=200.0)
        assert store.citation_counts() == {("a", 1): 2, ("b", 2): 1, ("a", 2): 1}
        assert store.citation_counts(since=150.0) == {("a", 2): 1}
    finally:
        store.close()


# -- the CPU LoRA ops fix (vLLM general plugin) ------------------------------------------------------
def test_lora_fix_is_a_vllm_general_plugin_and_masks_rows_without_adapter() -> None:
    from importlib.metadata import entry_points

    pytest.importorskip("vllm")
    import torch

    from kfresh.server.generation import lora_fix

    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("kfresh_lora_fix") == "kfresh.server.generation.lora_fix:register"
    lora_fix.register()
    lora_fix.register()  # idempotent
    assert lora_fix.is_active()
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    assert punica_cpu.sgmv_shrink is lora_ops.sgmv_shrink and punica_cpu.bgmv_expand is lora_fix.bgmv_expand
    gen = torch.Generator().manual_seed(0)
    lora_a = torch.randn(2, 1, 4, 8, generator=gen)
    lora_b = torch.randn(2, 1, 8, 4, generator=gen)
    x = torch.randn(3, 8, generator=gen)
    indices = torch.tensor([-1, 1, -1])  # rows 0 and 2 have no adapter; slot 1 is the LAST slot
    buffer = torch.zeros(3, 4)
    lora_ops.sgmv_shrink(x, lora_a, buffer, None, torch.tensor([1, 1, 1]), indices, 3, 1, 3, 1.0)
    y = torch.randn(3, 8, generator=gen)
    base = y.clone()
    lora_ops.sgmv_expand(buffer, lora_b, y, None, torch.tensor([1, 1, 1]), indices, 3, 1, 3, add_inputs=True)
    assert torch.equal(y[[0, 2]], base[[0, 2]]) and not torch.equal(y[1], base[1])
    assert torch.allclose(y[1], base[1] + lora_b[1, 0] @ (lora_a[1, 0] @ x[1]))


# -- real adapters on the real engine ---------------------------------------------------------------
@pytest.fixture(scope="module")
def peft_adapters(generator_path: str, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three rank-8 adapters with large random weights: each visibly changes greedy output."""
    from adapter_helper import make_adapters

    root = tmp_path_factory.mktemp("peft")
    return make_adapters(generator_path, [root / "a", root / "b", root / "c"], scale=0.05)


async def _generate(backend: GenerationBackend, prompt: str, adapter: str | None = None, max_tokens: int = 32) -> str:
    request = GenerationRequest(
        f"t-{uuid.uuid4().hex}", [{"role": "user", "content": prompt}], max_tokens=max_tokens, adapter=adapter
    )
    return "".join([chunk.text async for chunk in backend.generate(request)])


@pytest.mark.slow
def test_no_adapter_request_batched_with_adapter_requests_is_unchanged(
    engine_loop: Any, vllm_backend: Any, peft_adapters: list[Path]
) -> None:
    """FIELD-NOTES' bug: without the fix, index -1 applies the last adapter slot to the base request."""
    names = ("bugprobe-a", "bugprobe-b")
    prompt = "Write a short poem about autumn leaves."

    async def scenario() -> tuple[str, str, str]:
        for name, folder in zip(names, peft_adapters):
            await vllm_backend.load_adapter(name, str(folder))
        try:
            alone = await _generate(vllm_backend, prompt)
            # Both adapter slots (max_loras=2) are filled while the base request runs beside them.
            batched, *_ = await asyncio.gather(
                _generate(vllm_backend, prompt),
                _generate(vllm_backend, "Tell me a story about the sea.", names[0]),
                _generate(vllm_backend, "List some fruits.", names[1]),
            )
            tuned = await _generate(vllm_backend, prompt, names[1])
            return alone, batched, tuned
        finally:
            for name in names:
                await vllm_backend.unload_adapter(name)

    alone, batched, tuned = engine_loop.run(scenario(), timeout=300)
    assert tuned != alone, "the test adapter must visibly change the output"
    assert batched == alone, "a request without an adapter got one applied (CPU LoRA ops, index -1)"


@pytest.fixture()
def lora_server(
    engine_loop: Any, vllm_backend: Any, peft_adapters: list[Path], tmp_path: Path
) -> Iterator[tuple[ServerHandle, AdapterRegistry]]:
    registry = AdapterRegistry(tmp_path / "adapters")
    _publish(registry, peft_adapters[0])  # v0001, served from the start
    cfg = server_config(
        tmp_path / "home", generation__enable_lora=True, generation__adapter_poll_s=0.1,
        finetune__registry_dir=registry.root,
    )  # fmt: skip
    handle = ServerHandle(engine_loop, cfg, vllm_backend)
    yield handle, registry
    handle.stop()


@pytest.mark.slow
def test_hot_swap_and_rollback_during_concurrent_answers(
    lora_server: tuple[ServerHandle, AdapterRegistry], peft_adapters: list[Path]
) -> None:
    handle, registry = lora_server
    addr = f"127.0.0.1:{handle.port}"
    question = "Which colour are the trams of Velmora?"
    with KfreshClient(addr) as client:
        client.wait_ready(timeout=120)
        assert client.stats().adapter == "v0001"
        list(client.ingest([document("tram-1", "The trams of Velmora are painted teal.", source="guide")], timeout=30))
        while not any(c.doc_id == "tram-1" for c in client.retrieve(question, k=3).chunks):
            time.sleep(0.02)

        load = AnswerLoad(addr, question)
        try:
            load.wait_for("v0001", 3)
            v2 = _publish(registry, peft_adapters[1]).version  # as a separate distill process would
            published = time.perf_counter()
            while client.stats().adapter != v2:
                assert time.perf_counter() - published < 30, "the server never picked up the new version"
                time.sleep(0.01)
            FIGURES["hot_swap_pickup_ms"] = (time.perf_counter() - published) * 1000
            load.wait_for(v2, 3)

            start = time.perf_counter()
            reply = client.rollback_adapter(timeout=10)
            FIGURES["rollback_rpc_ms"] = (time.perf_counter() - start) * 1000
            assert (reply.current, reply.previous) == ("v0001", v2)
            assert client.stats().adapter == "v0001"
            load.wait_for("v0001", 3)
        finally:
            load.stop()
        assert not load.errors, load.errors
        assert FIGURES["rollback_rpc_ms"] < 1000

        base_text, base = _answer(client, question, adapter="none")
        pinned_text, pinned = _answer(client, question, adapter=v2)
        assert (base.adapter, pinned.adapter) == ("", v2) and base_text != pinned_text
        FIGURES["ttft_base_ms"] = base.timings.time_to_first_token_ms
        FIGURES["ttft_adapter_ms"] = pinned.timings.time_to_first_token_ms

        listing = client.list_adapters()
        flags = {a.version: (a.current, a.loaded) for a in listing.adapters}
        assert listing.enabled and listing.current == "v0001" and flags["v0001"] == (True, True)
        assert listing.adapters[0].served_name == "kfresh-v0001" and listing.adapters[0].metrics["recall"] == 0.9
        assert handle.runtime.indexer.citation_counts().get(("tram-1", 1), 0) > 0
    print(f"\nadapter figures: {json.dumps({k: round(v, 1) for k, v in FIGURES.items()})}")


@pytest.mark.slow
def test_tampered_adapter_is_refused_by_a_running_server(
    lora_server: tuple[ServerHandle, AdapterRegistry], peft_adapters: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from kfresh.cli import main

    handle, registry = lora_server
    bad = _publish(registry, peft_adapters[2], promote=False).version
    _tamper(registry, bad)
    with KfreshClient(f"127.0.0.1:{handle.port}") as client:
        client.wait_ready(timeout=120)
        with pytest.raises(grpc.RpcError) as err:
            client.promote_adapter(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sha256" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            _answer(client, "Hello?", adapter=bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        _point_at(registry, bad, ["v0001"])  # a pointer written behind the server's back
        time.sleep(0.5)  # several watcher polls
        assert client.stats().adapter == "v0001"
        _, done = _answer(client, "Hello?", closed_book=True, max_tokens=4)
        assert done.adapter == "v0001"
        with pytest.raises(grpc.RpcError) as err:
            _answer(client, "Hello?", adapter="v0042")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    addr = ["--addr", f"127.0.0.1:{handle.port}"]
    capsys.readouterr()
    assert main(["adapters", "list", *addr]) == 0
    listing = capsys.readouterr().out
    assert "* v0001" in listing and "current" in listing and f"  {bad}" in listing and "serving: v0001" in listing
    assert main(["adapters", "show", "v0001", "--json", *addr]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["served_name"] == "kfresh-v0001" and shown["current"] is True
    assert main(["adapters", "promote", bad, *addr]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


@pytest.mark.slow
def test_an_adapter_another_replica_unloaded_is_reloaded_on_demand(
    engine_loop: Any, remote_vllm_server: str, peft_adapters: list[Path], tmp_path: Path
) -> None:
    """Replicas sharing one `vllm serve`: another one's swap or shutdown unloads this one's adapter there."""
    import httpx

    registry = AdapterRegistry(tmp_path / "adapters")
    _publish(registry, peft_adapters[0])  # v0001
    cfg = server_config(tmp_path / "home", generation__backend="remote", generation__remote_url=remote_vllm_server,
                        generation__enable_lora=True, finetune__registry_dir=registry.root)  # fmt: skip
    handle = ServerHandle(engine_loop, cfg, None)
    try:
        with KfreshClient(f"127.0.0.1:{handle.port}") as client, httpx.Client(base_url=remote_vllm_server) as http:
            client.wait_ready(timeout=120)
            first, done = _answer(client, "Name three uses of copper.", closed_book=True, max_tokens=12)
            assert done.adapter == "v0001"
            assert http.post("/v1/unload_lora_adapter", json={"lora_name": "kfresh-v0001"}).status_code == 200
            again, done = _answer(client, "Name three uses of copper.", closed_book=True, max_tokens=12)
            assert done.adapter == "v0001" and again == first  # greedy: the same adapter, loaded again
            assert "kfresh-v0001" in {m["id"] for m in http.get("/v1/models").json()["data"]}
    finally:
        handle.stop()


@pytest.mark.slow
def test_remote_backend_loads_and_unloads_versions_by_name(
    engine_loop: Any, remote_vllm_server: str, peft_adapters: list[Path], tmp_path: Path
) -> None:
    import httpx

    from kfresh.server.generation.openai_remote import OpenAIRemoteBackend

    registry = AdapterRegistry(tmp_path / "adapters")
    for folder in peft_adapters[:2]:
        _publish(registry, folder)  # v0002 current, v0001 the rollback target
    backend = OpenAIRemoteBackend(GenerationConfig(backend="remote", remote_url=remote_vllm_server))

    async def served() -> set[str]:
        async with httpx.AsyncClient(base_url=remote_vllm_server) as http:
            return {m["id"] for m in (await http.get("/v1/models")).json()["data"]}

    async def scenario() -> None:
        await backend.start()
        manager = AdapterManager(registry, backend)
        try:
            assert await manager.sync() == "v0002"
            await asyncio.sleep(0.5)  # the rollback target loads in the background
            assert {"kfresh-v0001", "kfresh-v0002"} <= await served()
            prompt = "Name three uses of copper."
            assert await _generate(backend, prompt, "kfresh-v0002") != await _generate(backend, prompt)
            change = await manager.rollback()
            assert change.current == "v0001" and "kfresh-v0002" not in await served()
        finally:
            await manager.close(unload=True)
            assert not {"kfresh-v0001", "kfresh-v0002"} & await served()
            await backend.shutdown()

    engine_loop.run(scenario(), timeout=240)
