"""ModelRouter's loading, LRU unloading, limits and failures, on stand-in engines (no
model): which model is unloaded, that a busy one never is, bounded waits, shared loads."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from tessellm.config import EngineArgs
from tessellm.errors import ConfigError, ModelLoadError
from tessellm.server.context import LEASES, ROUTED_CONTEXT
from tessellm.server.errors import APIError
from tessellm.server.models_config import ModelSpec
from tessellm.server.router import ModelRouter

# Alone, not beside other tests (the README's command runs these after the parallel
# part): they bound how long a shutdown or a switch may take.
pytestmark = pytest.mark.serial

MiB = 2**20


class FakeEngine:
    """What the router touches of an engine; its runner's weights take ``mib`` MiB."""

    def __init__(self, spec: ModelSpec, mib: int = 1) -> None:
        self.name = spec.name
        model = torch.nn.Linear(mib * MiB // 4, 1, bias=False)  # float32: mib MiB
        runner = SimpleNamespace(model=model, num_blocks=0, bytes_per_block=lambda: 0)
        self.engine = SimpleNamespace(executor=SimpleNamespace(runner=runner))
        self.dead: BaseException | None = None
        self.started = False
        self.shut_down = False

    def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.shut_down = True


class Loader:
    """load_engine: records loads; ``sizes`` gives each model's MiB, ``delay`` its seconds,
    ``fail`` the models whose load raises."""

    def __init__(self, sizes=None, delay=None, fail=()) -> None:
        self.sizes = sizes or {}
        self.delay = delay or {}
        self.fail = set(fail)
        self.loads: list[str] = []
        self.engines: list[FakeEngine] = []
        self.lock = threading.Lock()

    def __call__(self, spec: ModelSpec) -> FakeEngine:
        time.sleep(self.delay.get(spec.name, 0))
        if spec.name in self.fail:
            raise ConfigError("no such weights")
        with self.lock:
            self.loads.append(spec.name)
        engine = FakeEngine(spec, self.sizes.get(spec.name, 1))
        self.engines.append(engine)
        return engine


def specs(*names: str) -> list[ModelSpec]:
    return [ModelSpec([n], EngineArgs(model=f"/models/{n}")) for n in names]


def make_router(names=("a", "b", "c"), loader=None, prepare=None, **kwargs) -> ModelRouter:
    return ModelRouter(
        specs(*names),
        loader or Loader(),
        make_context=lambda entry, engine: SimpleNamespace(engine=engine, max_model_len=64),
        prepare_model=prepare or (lambda spec: None),
        **kwargs,
    )


class Requests:
    """Scopes as ModelLeaseMiddleware makes them; ``end`` releases what one holds."""

    def __init__(self, router: ModelRouter) -> None:
        self.router = router

    async def start(self, name: str | None) -> dict:
        scope = {LEASES: []}
        await self.router.acquire(scope, name)
        return scope

    def end(self, scope: dict) -> None:
        for entry in scope[LEASES]:
            self.router.release(entry)

    async def one(self, name: str | None) -> str:
        scope = await self.start(name)
        try:
            return scope[ROUTED_CONTEXT].engine.name
        finally:
            self.end(scope)


def loaded(router: ModelRouter) -> set[str]:
    return {e.name for e in router.loaded()}


def test_lazy_loading_and_least_recently_used_unloading():
    async def main():
        loader = Loader()
        router = make_router(loader=loader, max_loaded=2)
        await router.start()
        assert loaded(router) == {"a"} and loader.loads == ["a"]
        req = Requests(router)
        assert await req.one(None) == "a"  # the default
        assert await req.one("b") == "b"
        assert loaded(router) == {"a", "b"}
        assert await req.one("a") == "a"  # b is now the least recently used
        assert await req.one("c") == "c"
        assert loaded(router) == {"a", "c"}
        assert loader.engines[1].shut_down and not loader.engines[0].shut_down
        assert await req.one("b") == "b"  # back again: a goes (c was used last)
        assert loaded(router) == {"b", "c"} and loader.loads == ["a", "b", "c", "b"]
        await router.shutdown()
        assert all(e.shut_down for e in loader.engines) and not loaded(router)

    asyncio.run(main())


def test_a_busy_model_is_never_unloaded_the_load_waits_for_it():
    async def main():
        router = make_router(max_loaded=1, load_timeout=5)
        await router.start()
        req = Requests(router)
        busy = await req.start("a")  # a request in flight on a
        waiting = asyncio.create_task(req.one("b"))
        await asyncio.sleep(0.2)
        assert not waiting.done() and loaded(router) == {"a"}
        req.end(busy)  # a's request ends: b may load now
        assert await asyncio.wait_for(waiting, 5) == "b"
        assert loaded(router) == {"b"}

    asyncio.run(main())


def test_no_room_is_a_503_after_the_timeout_and_the_busy_model_stays():
    async def main():
        router = make_router(max_loaded=1, load_timeout=0.3)
        await router.start()
        req = Requests(router)
        busy = await req.start("a")
        with pytest.raises(APIError) as err:
            await req.one("b")
        assert err.value.status == 503 and err.value.code in ("model_capacity", "model_loading")
        assert "'b'" in err.value.message
        assert loaded(router) == {"a"}
        req.end(busy)
        router.load_timeout = 30  # no race with a busy machine from here
        assert await req.one("b") == "b"

    asyncio.run(main())


def test_a_slow_load_is_a_503_and_finishes_for_the_next_request():
    async def main():
        loader = Loader(delay={"b": 0.6})
        router = make_router(loader=loader, load_timeout=0.2)
        await router.start()
        req = Requests(router)
        with pytest.raises(APIError) as err:
            await req.one("b")
        assert err.value.status == 503 and err.value.code == "model_loading"
        assert "not loaded yet" in err.value.message
        router.load_timeout = 30
        assert await req.one("b") == "b"  # the same load, which went on without the client
        assert loader.loads == ["a", "b"]

    asyncio.run(main())


def test_concurrent_requests_share_one_load():
    async def main():
        loader = Loader(delay={"b": 0.2})
        router = make_router(loader=loader)
        await router.start()
        req = Requests(router)
        names = await asyncio.gather(*(req.one("b") for _ in range(5)))
        assert names == ["b"] * 5 and loader.loads == ["a", "b"]

    asyncio.run(main())


def test_memory_budget_unloads_least_recently_used_idle_models():
    async def main():
        loader = Loader(sizes={"a": 4, "b": 4, "c": 6})
        router = make_router(loader=loader, memory_budget=9 * MiB)
        await router.start()
        req = Requests(router)
        await req.one("b")
        assert loaded(router) == {"a", "b"}  # 8 MiB
        await req.one("c")  # unknown size before loading: its real 6 MiB trims after
        assert loaded(router) == {"c"}
        assert router.entries[2].bytes == 6 * MiB
        await req.one("a")  # a's size is known now: fits beside c? 10 > 9, so c goes
        assert loaded(router) == {"a"}

    asyncio.run(main())


def test_a_failed_load_names_the_model_and_unloads_nothing():
    async def main():
        def prepare(spec):
            if spec.name == "c":
                raise ModelLoadError("model '/models/c' is neither a local path ...")

        loader = Loader(fail={"b"})
        router = make_router(loader=loader, prepare=prepare, max_loaded=1)
        await router.start()
        req = Requests(router)
        with pytest.raises(APIError) as err:
            await req.one("c")  # refused before any room is made
        assert err.value.status == 400 and err.value.code == "model_load_failed"
        assert "the model 'c' could not be loaded" in err.value.message
        assert loaded(router) == {"a"}
        with pytest.raises(APIError) as err:
            await req.one("b")
        assert err.value.status == 400 and "no such weights" in err.value.message
        assert await req.one("a") == "a"  # and the server serves on
        with pytest.raises(APIError) as err:
            await req.one("nope")
        assert err.value.status == 404 and "'a', 'b', 'c'" in err.value.message

    asyncio.run(main())


def test_a_dead_engine_is_started_afresh_on_next_use():
    async def main():
        loader = Loader()
        router = make_router(loader=loader)
        await router.start()
        first = loader.engines[0]
        first.dead = RuntimeError("worker died")
        assert await Requests(router).one("a") == "a"
        assert first.shut_down and loader.loads == ["a", "a"]

    asyncio.run(main())


def test_an_unloaded_engine_gives_its_memory_back(tmp_path):
    """Real engines: once a model is unloaded nothing holds its engine or its weights."""
    import gc
    import weakref
    from dataclasses import replace

    from tessellm.engine.async_engine import AsyncLLMEngine
    from tessellm.testing import tiny_model

    path = tiny_model("LlamaForCausalLM", tmp_path / "llama")
    args = EngineArgs(model=str(path), dtype="float32", device="cpu", download_dir=str(tmp_path))
    models = [ModelSpec([n], replace(args, served_model_name=n)) for n in ("a", "b")]

    async def main():
        router = ModelRouter(
            models, lambda s: AsyncLLMEngine.from_engine_args(s.args), max_loaded=1
        )
        await router.start()
        engine = router.entries[0].ctx.engine.engine
        refs = [weakref.ref(engine), weakref.ref(engine.executor.runner.model)]
        del engine
        scope = {LEASES: []}
        ctx, served = await router.acquire(scope, "b")
        assert served == "b" and ctx.model_names == ["b"] and loaded(router) == {"b"}
        assert router.entries[1].bytes > 0  # weights + KV cache, measured
        Requests(router).end(scope)
        gc.collect()
        assert [ref() for ref in refs] == [None, None]
        await router.shutdown()

    asyncio.run(main())


def test_shutdown_ends_a_load_that_waits_for_room():
    async def main():
        router = make_router(max_loaded=1, load_timeout=60)
        await router.start()
        req = Requests(router)
        await req.start("a")  # never ends: b's load waits for room
        waiting = asyncio.create_task(req.one("b"))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await asyncio.wait_for(router.shutdown(), 10)
        assert time.monotonic() - started < 5
        with pytest.raises(APIError) as err:
            await waiting
        assert err.value.status == 503 and "shutting down" in err.value.message

    asyncio.run(main())
