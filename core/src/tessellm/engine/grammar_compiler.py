"""Compiling structured-output grammars: which registered backend compiles a request's spec,
the backend built on first use, and the compiles run in a small thread pool behind a bounded
LRU of futures (a schema used again is ready at once; a failed compile is not kept).

Apart from ``engine/structured_output.py`` because this part knows nothing of requests or
steps and is thread-safe (the async front submits from the event loop to answer a bad schema
with a 400 before adding the request), while the ``StructuredOutputManager`` that owns one of
these parks requests and drives matchers on the engine thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from tessellm.engine.step_recovery import RequestFailedError
from tessellm.errors import ConfigError, InvalidRequestError
from tessellm.interfaces.structured_output import (
    CompiledGrammar,
    GrammarSpec,
    StructuredOutputBackend,
)
from tessellm.plugins import PluginSet
from tessellm.sampling_params import StructuredOutputsParams

KIND = "structured_output_backends"
AUTO = "auto"
# "auto" takes the first of these that is registered, else the first registered at all.
PREFERENCE = ("xgrammar", "llguidance")
INSTALL_HINT = "install tessellm-structured-xgrammar or tessellm-structured-llguidance"
CACHE_SIZE = 256  # compiled grammars kept (the futures; a compiled JSON schema is small)
COMPILE_WORKERS = 2


class GrammarCompiler:
    """Compiles ``StructuredOutputsParams`` with the backend they name (see the module
    docstring). Every method is thread-safe."""

    def __init__(
        self,
        plugins: PluginSet,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: Iterable[int],
        default_backend: str,
        cache_size: int = CACHE_SIZE,
        workers: int = COMPILE_WORKERS,
    ) -> None:
        self.plugins = plugins
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(sorted(eos_token_ids))
        if default_backend != AUTO and plugins.get(KIND, default_backend) is None:
            raise ConfigError(self._unknown(default_backend, "structured_outputs_backend"))
        self.default_backend = default_backend
        self.cache_size = cache_size
        self.workers = workers
        self._backends: dict[str, StructuredOutputBackend] = {}
        self._backend_lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Future[CompiledGrammar]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def _unknown(self, name: str, what: str) -> str:
        known = ", ".join(sorted(self.plugins.names(KIND)))
        if not known:
            return f"{what} {name!r}: no structured output backend is installed; {INSTALL_HINT}"
        return f"unknown {what} {name!r} (known: {known}, or auto)"

    def backend_name(self, so: StructuredOutputsParams) -> str:
        """The registered backend that compiles ``so`` (``InvalidRequestError`` if none)."""
        name = so.backend or self.default_backend
        if name != AUTO:
            if self.plugins.get(KIND, name) is None:
                raise InvalidRequestError(self._unknown(name, "structured_outputs.backend"))
            return name
        names = self.plugins.names(KIND)
        for preferred in PREFERENCE:
            if preferred in names:
                return preferred
        if not names:
            raise InvalidRequestError(
                f"structured outputs need a grammar backend and none is installed; {INSTALL_HINT}"
            )
        return names[0]

    def _backend(self, name: str) -> StructuredOutputBackend:
        # Built on first use, in a compile worker: a backend reads the whole vocabulary.
        with self._backend_lock:
            backend = self._backends.get(name)
            if backend is None:
                cls = self.plugins.load(KIND, name)
                if not (isinstance(cls, type) and issubclass(cls, StructuredOutputBackend)):
                    raise RequestFailedError(
                        f"structured output backend {name!r} is not a StructuredOutputBackend"
                    )
                try:
                    backend = cls(self.tokenizer, self.vocab_size, self.eos_token_ids)
                except Exception as exc:
                    raise RequestFailedError(
                        f"structured output backend {name!r} cannot serve this model's "
                        f"tokenizer: {type(exc).__name__}: {exc}"
                    ) from exc
                self._backends[name] = backend
            return backend

    def _compile(self, name: str, spec: GrammarSpec) -> CompiledGrammar:
        backend = self._backend(name)
        if spec.kind not in backend.capabilities.kinds:
            raise InvalidRequestError(
                f"structured output backend {name!r} cannot compile {spec.kind!r} "
                f"(it compiles: {', '.join(backend.capabilities.kinds)})"
            )
        try:
            return backend.compile(spec)
        except ValueError as exc:  # the contract: the spec is not valid, and why
            raise InvalidRequestError(f"structured_outputs.{spec.kind}: {exc}") from None
        except Exception as exc:
            raise RequestFailedError(
                f"structured output backend {name!r} failed to compile the "
                f"{spec.kind}: {type(exc).__name__}: {exc}"
            ) from exc

    def submit(self, so: StructuredOutputsParams) -> Future[CompiledGrammar]:
        """The compile of ``so``'s grammar: cached, or started in the pool. The future's
        error is an ``InvalidRequestError`` naming the problem for an invalid spec."""
        name = self.backend_name(so)
        spec = so.spec()
        key = (name, spec.key)
        with self._cache_lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tessellm-grammar")
            future = self._pool.submit(self._compile, name, spec)
            self._cache[key] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        future.add_done_callback(lambda f: self._forget_failure(key, f))
        return future

    def _forget_failure(self, key: tuple[str, str], future: Future[CompiledGrammar]) -> None:
        # A failure is not kept: the next request with the same spec compiles again.
        if future.cancelled() or future.exception() is not None:
            with self._cache_lock:
                if self._cache.get(key) is future:
                    del self._cache[key]

    def shutdown(self) -> None:
        """Stop the compile workers; compiles not started are cancelled."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
