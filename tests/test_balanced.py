"""Several vLLM servers behind one kfresh: the real `vllm serve` beside replicas that are down, fail
mid-request, refuse an adapter or come back late. The misbehaving replicas are httpx mock transports:
fakes for fault injection only; every answer a test checks comes from the real server."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from kfresh.core.config import GenerationConfig
from kfresh.core.errors import Unavailable
from kfresh.server.generation.balanced import BalancedRemoteBackend
from kfresh.server.generation.base import GenerationRequest
from kfresh.server.generation.factory import create_backend
from kfresh.server.generation.openai_remote import OpenAIRemoteBackend

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"


def mock_replica(
    name: str, handler: Callable[[httpx.Request], httpx.Response], calls: list[str]
) -> OpenAIRemoteBackend:
    def record(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": MODEL}]})
        return handler(request)

    cfg = GenerationConfig(backend="remote", remote_url=f"http://{name}.invalid", remote_timeout_s=5)
    return OpenAIRemoteBackend(cfg, start_timeout_s=1.0, poll_interval_s=0.1, transport=httpx.MockTransport(record))


def real_replica(url: str) -> OpenAIRemoteBackend:
    return OpenAIRemoteBackend(GenerationConfig(backend="remote", remote_url=url), start_timeout_s=5.0)


def balanced(*replicas: tuple[OpenAIRemoteBackend, str]) -> BalancedRemoteBackend:
    cfg = GenerationConfig(backend="remote", remote_timeout_s=30, remote_health_interval_s=3600)  # rounds by hand
    return BalancedRemoteBackend(cfg, [r for r, _ in replicas], [u for _, u in replicas])


async def ask(backend: Any, adapter: str | None = None) -> str:
    request = GenerationRequest(f"t-{uuid.uuid4().hex}", [{"role": "user", "content": "Name a colour."}],
                                max_tokens=8, adapter=adapter)  # fmt: skip
    return "".join([c.text async for c in backend.generate(request)])


async def served(url: str) -> set[str]:
    async with httpx.AsyncClient(base_url=url) as http:
        return {m["id"] for m in (await http.get("/v1/models")).json()["data"]}


@pytest.fixture(scope="module")
def adapter_dir(generator_path: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from adapter_helper import make_adapters

    return make_adapters(generator_path, [tmp_path_factory.mktemp("balanced") / "a"], scale=0.05)[0]


def test_several_urls_make_a_balanced_backend() -> None:
    backend = create_backend(_config("http://a:8000, http://b:8000"))
    assert isinstance(backend, BalancedRemoteBackend) and [r.url for r in backend.replicas] == [
        "http://a:8000",
        "http://b:8000",
    ]
    single = create_backend(_config("http://a:8000"))  # one server: the balancer reloads adapters after its restart
    assert isinstance(single, BalancedRemoteBackend) and [r.url for r in single.replicas] == ["http://a:8000"]


def test_a_restarted_server_gets_the_adapters_back_before_traffic(engine_loop: Any) -> None:
    """vLLM forgets runtime-loaded LoRAs when it restarts; kfresh must load them again before routing."""
    server = {"up": True, "adapters": set()}

    def vllm(request: httpx.Request) -> httpx.Response:
        if not server["up"]:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/v1/load_lora_adapter":
            server["adapters"].add(json.loads(request.content)["lora_name"])
        return httpx.Response(200)

    calls: list[str] = []
    backend = balanced((mock_replica("one", vllm, calls), "mock://one"))

    async def scenario() -> None:
        await backend.start()
        await backend.load_adapter("kfresh-v0001", "/adapters/v0001")
        server.update(up=False, adapters=set())  # the vLLM server dies and restarts empty
        await backend.refresh()
        assert not backend.ready
        server["up"] = True
        await backend.refresh()
        await backend.shutdown()

    engine_loop.run(scenario(), timeout=30)
    assert server["adapters"] == {"kfresh-v0001"} and calls.count("/v1/load_lora_adapter") == 2


def _config(url: str) -> Any:
    from kfresh.core.config import KfreshConfig

    data = KfreshConfig().model_dump()
    data["generation"].update(backend="remote", remote_url=url)
    return KfreshConfig.model_validate(data)


def test_requests_avoid_a_dead_replica_and_fail_over_from_a_broken_one(
    engine_loop: Any, remote_vllm_server: str
) -> None:
    calls: list[str] = []

    def broken(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        raise httpx.ConnectError("replica crashed", request=request)  # dies on every generation

    backend = balanced(
        (real_replica(remote_vllm_server), remote_vllm_server),
        (real_replica("http://127.0.0.1:9"), "http://127.0.0.1:9"),  # nothing listens there
        (mock_replica("broken", broken, calls), "mock://broken"),
    )

    async def scenario() -> list[str]:
        await backend.start()
        try:
            assert [r.routable for r in backend.replicas] == [True, False, True]
            answers = [await ask(backend) for _ in range(4)]
            assert not backend.replicas[2].routable, "a replica that failed a request leaves the rotation"
            await backend.refresh()  # its /health says fine: back in, and the next failure moves traffic again
            assert backend.replicas[2].routable
            answers += [await ask(backend) for _ in range(2)]
            return answers
        finally:
            await backend.shutdown()

    answers = engine_loop.run(scenario(), timeout=180)
    assert all(answers), answers
    assert backend.replicas[1].served == 0 and "/v1/chat/completions" in calls
    assert backend.replicas[0].served == 6


def test_an_adapter_is_loaded_everywhere_or_nowhere(
    engine_loop: Any, remote_vllm_server: str, adapter_dir: Path
) -> None:
    def refuses(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/load_lora_adapter":
            return httpx.Response(500, json={"error": {"message": "out of LoRA slots"}})
        return httpx.Response(200)

    name = f"kfresh-balanced-{uuid.uuid4().hex[:6]}"
    backend = balanced(
        (real_replica(remote_vllm_server), remote_vllm_server), (mock_replica("refuses", refuses, []), "mock://r")
    )

    async def scenario() -> None:
        await backend.start()
        try:
            with pytest.raises(Unavailable, match="not loaded on every replica"):
                await backend.load_adapter(name, str(adapter_dir))
            assert name not in await served(remote_vllm_server), "the replica that loaded it must unload it again"
        finally:
            await backend.shutdown()

    engine_loop.run(scenario(), timeout=180)


def test_a_late_replica_gets_the_adapters_before_any_traffic(
    engine_loop: Any, remote_vllm_server: str, adapter_dir: Path
) -> None:
    up = {"health": False}
    calls: list[str] = []

    def late(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200 if up["health"] else 503)
        if request.url.path == "/v1/chat/completions":
            raise httpx.ConnectError("not serving in this test", request=request)
        return httpx.Response(200)

    name = f"kfresh-balanced-{uuid.uuid4().hex[:6]}"
    backend = balanced(
        (real_replica(remote_vllm_server), remote_vllm_server), (mock_replica("late", late, calls), "mock://late")
    )

    async def scenario() -> tuple[str, str]:
        await backend.start()
        try:
            assert [r.routable for r in backend.replicas] == [True, False]
            await backend.load_adapter(name, str(adapter_dir))  # the routable replica only
            assert name in await served(remote_vllm_server) and "/v1/load_lora_adapter" not in calls
            up["health"] = True
            await backend.refresh()
            late_replica = backend.replicas[1]
            assert late_replica.routable and late_replica.adapters == {name}
            assert "/v1/load_lora_adapter" in calls and "/v1/chat/completions" not in calls
            tuned, base = await ask(backend, adapter=name), await ask(backend)
            await backend.unload_adapter(name)
            assert name not in await served(remote_vllm_server) and not late_replica.adapters
            return tuned, base
        finally:
            await backend.shutdown()

    tuned, base = engine_loop.run(scenario(), timeout=180)
    assert tuned and base
