"""The Ollama engine: every call goes through the ``ollama`` client and one error choke point."""

from __future__ import annotations

import difflib
import json
import os
import time
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlsplit

from tuner.engines.base import DRAFT_LENGTHS, Drafting, Echo, Engine, GpuOffload, ModelInfo, ServerMemory
from tuner.errors import LoadError, ModelNotFoundError, ServerError, ServerHungError, ServerSetupError, TunerError
from tuner.machine import is_local
from tuner.metrics import RequestSample
from tuner.server import KEEP_ALIVE
from tuner.settings import REQUEST_PARAMS, SERVER_PARAMS
from tuner.terminal import command

DEFAULT_HOST = "http://127.0.0.1:11434"
NS_PER_MS = 1_000_000
MIB = 1024 * 1024
#: How long a liveness check (/api/version) may take: a live server answers it at once.
VERSION_TIMEOUT_S = 10.0
T = TypeVar("T")
#: The first Ollama that takes ``draft_num_predict`` (MTP drafting; docs/drafting.md).
DRAFT_MIN_VERSION = (0, 31)
#: Ollama's draft length on a model with MTP heads when the request sends none.
DRAFT_DEFAULT = 4


def version_tuple(version: str) -> tuple[int, ...] | None:
    """(0, 31, 2) for "0.31.2" (a "-rc1" suffix dropped); None when it is no version."""
    parts = []
    for piece in version.strip().lstrip("v").split("-")[0].split("."):
        if not piece.isdigit():
            return None
        parts.append(int(piece))
    return tuple(parts) if parts else None


def mtp_evidence(model_info: dict[str, Any], capabilities: list[str]) -> str:
    """What in /api/show says the model has multi-token-prediction heads ("" when nothing)."""
    for key, value in model_info.items():
        if key.endswith(".nextn_predict_layers") and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return f"{key}={value}"
    for key, value in model_info.items():
        if (key.startswith("mtp.") or ".mtp." in key or key.endswith(".mtp")) and value:
            return key
    for cap in capabilities:
        if str(cap).lower() in ("mtp", "draft", "speculative"):
            return f"capability '{cap}'"
    return ""


def normalise_host(host: str | None, hint: str = "--host / OLLAMA_HOST") -> str:
    """Turn OLLAMA_HOST-style values into a base URL, the way Ollama reads them.

    ``host`` or ``host:port`` without a scheme is http on port 11434 by default; an explicit
    ``http://host`` / ``https://host`` without a port is port 80 / 443; ``:11434`` is
    127.0.0.1.
    """
    raw = (host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST).strip()
    has_scheme = "://" in raw
    text = raw if has_scheme else f"http://{raw}"
    if text.split("://", 1)[1].startswith(":"):
        text = text.replace("://", "://127.0.0.1", 1)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ServerSetupError(
            f"invalid Ollama host '{raw}' ({hint}): write it as http://HOST:PORT, e.g. {DEFAULT_HOST}"
        )
    if port is None:
        port = (443 if parts.scheme == "https" else 80) if has_scheme else 11434
    hostname = parts.hostname
    if ":" in hostname:
        hostname = f"[{hostname}]"
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{hostname}:{port}{path}"


def _import_ollama() -> Any:
    """The ``ollama`` package. Its import builds a default client from $OLLAMA_HOST, which we
    never use: a malformed value must not fail the import before our own check names it."""
    import sys

    if "ollama" in sys.modules:
        return sys.modules["ollama"]
    saved = os.environ.pop("OLLAMA_HOST", None)
    try:
        import ollama
    finally:
        if saved is not None:
            os.environ["OLLAMA_HOST"] = saved
    return ollama


class _StreamClock:
    """Client-side timing of one streamed request: first non-empty chunk, and the final one."""

    def __init__(self, host: str, num_predict: int | None = None, timeout_s: float | None = None) -> None:
        self.host = host
        self.start = time.perf_counter()
        self.first: float | None = None
        self.final: Any = None
        self.chunks = 0
        # A stream is read within bounds: a server that ignores num_predict, or trickles a chunk
        # just inside the read timeout, must not keep the trial (and its memory) forever.
        self.max_chunks = None if num_predict is None or num_predict < 0 else max_stream_chunks(num_predict)
        self.timeout_s = timeout_s
        self.num_predict = num_predict

    def see(self, chunk: Any) -> None:
        now = time.perf_counter()
        if self.first is None and (chunk.response or getattr(chunk, "thinking", None)):
            self.first = now
        if chunk.done:
            self.final = chunk
            return
        self.chunks += 1
        if self.max_chunks is not None and self.chunks > self.max_chunks:
            raise ServerError(
                f"Ollama at {self.host} streamed more than {self.max_chunks} chunks for num_predict "
                f"{self.num_predict}: it does not honour num_predict; check the server"
            )
        if self.timeout_s is not None and now - self.start > self.timeout_s:
            raise ServerHungError(
                f"server did not finish a generate request in {self.timeout_s:g} s (--timeout): it streams "
                "too slowly; check the server's log, or raise --timeout"
            )

    def sample(self) -> RequestSample:
        """The request's sample; raises ServerError if the stream never sent its final message."""
        end = time.perf_counter()
        if self.final is None:
            raise ServerError(
                f"Ollama at {self.host} ended the stream without its final message: "
                "the server may have crashed; check its log"
            )
        return _sample(self.final, self.start, self.first, end)


def max_stream_chunks(num_predict: int) -> int:
    """The most chunks read from one streamed generate: one per token, and room for a
    server's empty or thinking chunks."""
    return 2 * num_predict + 64


def _sample(final: Any, start: float, first: float | None, end: float) -> RequestSample:
    """A RequestSample from the final stream object (ns durations) and client-side clocks."""
    return RequestSample(
        prompt="",
        repeat=0,
        ttft_ms=((first or end) - start) * 1e3,
        latency_ms=(end - start) * 1e3,
        prompt_tokens=int(final.prompt_eval_count or 0),
        prompt_eval_ms=(final.prompt_eval_duration or 0) / NS_PER_MS,
        eval_tokens=int(final.eval_count or 0),
        eval_ms=(final.eval_duration or 0) / NS_PER_MS,
        load_ms=(final.load_duration or 0) / NS_PER_MS,
        total_ms=(final.total_duration or 0) / NS_PER_MS,
        done_reason=str(final.done_reason or ""),
    )


class OllamaEngine(Engine):
    """Talks to a running Ollama server over HTTP."""

    name = "ollama"
    supported_params: tuple[str, ...] = REQUEST_PARAMS
    reports_server_memory = True

    def __init__(self, host: str | None = None, timeout_s: float = 600.0, server: Any = None,
                 host_hint: str = "--host / OLLAMA_HOST") -> None:
        #: A tuner-managed ``ollama serve`` (tuner.server.ManagedServer), or None for a running one.
        self.server = server
        if server is not None:
            self.supported_params = self.supported_params + SERVER_PARAMS
            host = server.url
        self.host = normalise_host(host, host_hint)
        ollama = _import_ollama()
        #: How the user points the tuner at another server, for error messages (``tune check``
        #: reads no OLLAMA_HOST: it measures the study's own server unless --host says otherwise).
        self.host_hint = host_hint
        self.local = server is not None or is_local(self.host)
        self._ollama = ollama
        self._timeout_s = timeout_s
        self._client = ollama.Client(host=self.host, timeout=timeout_s)
        self._tags: list[dict[str, Any]] | None = None
        #: What /api/ps listed before the study (None: not recorded), and what the tuner ran.
        self._loaded_before: set[str] | None = None
        self._used: set[str] = set()

    # -- the one choke point -------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T], model: str | None = None) -> T:
        """Run ``fn``; map transport and server failures to TunerErrors that name the fix."""
        import httpx

        try:
            return fn()
        except self._ollama.ResponseError as e:
            msg = (e.error or "").strip()
            if e.status_code == 404 and model is not None:
                raise self._not_found(model) from None
            if e.status_code in (499, 503):
                # Queue full or cancelled: the server is busy, not the config at fault.
                raise ServerError(f"Ollama at {self.host} is busy ({e.status_code}): {msg}") from None
            if e.status_code == -1 or e.status_code >= 500:
                raise LoadError(msg or f"server error {e.status_code}") from None
            raise ServerError(f"Ollama at {self.host} rejected {what} ({e.status_code}): {msg}") from None
        except (ConnectionError, httpx.ConnectError):
            self._check_managed()
            raise ServerError(
                f"cannot reach Ollama at {self.host}: is it running? Start it with `ollama serve` "
                f"or point {self.host_hint} at it"
            ) from None
        except httpx.TimeoutException:
            if what.startswith(("a generate", "concurrent generate", "a load")):
                if not self._answers():
                    # A hung or overloaded server says nothing about the config: a transient FAIL.
                    raise ServerError(
                        f"Ollama at {self.host} stopped answering: no reply to {what} within --timeout "
                        f"{self._timeout_s:g} s, nor to /api/version within {VERSION_TIMEOUT_S:g} s; "
                        "the server is hung or overloaded: check it (restart `ollama serve`) and re-run to resume"
                    ) from None
                # It answers, but not this: a hung runner or a load slower than --timeout.
                raise ServerHungError(
                    f"server did not answer in {self._timeout_s:g} s ({what}; it answers /api/version): "
                    "check the server's log, or raise --timeout if loads are this slow"
                ) from None
            raise ServerError(
                f"Ollama at {self.host} did not answer {what} in time: check the server, "
                "or raise --timeout"
            ) from None
        except (httpx.RemoteProtocolError, httpx.ReadError) as e:
            self._check_managed()
            raise ServerError(
                f"Ollama at {self.host} broke off {what} ({e.__class__.__name__}): "
                "check the server log"
            ) from None
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            raise ServerError(
                f"Ollama at {self.host} sent a malformed response to {what}: {e}; "
                "is this an Ollama server?"
            ) from None

    def _check_managed(self) -> None:
        """If our managed server died, say so with its log (LoadError: the config crashed it)."""
        if self.server is not None:
            self.server.check_alive()

    def _not_found(self, model: str) -> ModelNotFoundError:
        names = [m["name"] for m in self._list_tags(refresh=True)]
        close = difflib.get_close_matches(model, names, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? Or pull it" if close else "pull it"
        return ModelNotFoundError(
            f"model '{model}' is not installed on {self.host}: {hint} with `{command('ollama', 'pull', model)}`"
        )

    # -- server and models ---------------------------------------------------------------
    def server_info(self) -> dict[str, Any]:
        info = self._server_info()
        if self.server is not None:
            info["managed"] = True
            info["server_log"] = str(self.server.log_path or "")
        return info

    def _version(self, timeout_s: float) -> dict[str, Any]:
        """GET /api/version through the client's HTTP connection."""
        # The one private access: ollama-python (0.6.3) has no method for /api/version.
        r = self._client._client.get("/api/version", timeout=timeout_s)
        r.raise_for_status()
        return dict(r.json())

    def _answers(self) -> bool:
        """Whether the server still answers at all (after a request timed out)."""
        try:
            self._version(min(VERSION_TIMEOUT_S, self._timeout_s))
            return True
        except Exception:
            return False

    def _server_info(self) -> dict[str, Any]:
        import httpx

        try:
            data = self._call("/api/version", lambda: self._version(min(VERSION_TIMEOUT_S, self._timeout_s)))
        except httpx.HTTPStatusError as e:
            raise ServerError(
                f"{self.host} answered /api/version with {e.response.status_code}: is this an Ollama server?"
            ) from None
        return {"engine": "ollama", "host": self.host, "version": str(data.get("version", "unknown"))}

    def _list_tags(self, refresh: bool = False) -> list[dict[str, Any]]:
        if self._tags is None or refresh:
            resp = self._call("/api/tags", self._client.list)
            self._tags = [
                {
                    "name": m.model,
                    "digest": m.digest or "",
                    "size": m.size or 0,
                    "family": (m.details.family if m.details else "") or "",
                    "parameter_size": (m.details.parameter_size if m.details else "") or "",
                    "quantization": (m.details.quantization_level if m.details else "") or "",
                }
                for m in resp.models
            ]
        return self._tags

    def model_info(self, model: str) -> ModelInfo:
        resp = self._call("/api/show", lambda: self._client.show(model), model=model)
        info = dict(resp.modelinfo or {})
        arch = str(info.get("general.architecture") or (resp.details.family if resp.details else "") or "")
        block = info.get(f"{arch}.block_count")
        ctx = info.get(f"{arch}.context_length")
        if not isinstance(block, int) or not isinstance(ctx, int):
            raise ServerError(
                f"/api/show for '{model}' lacks {arch}.block_count or {arch}.context_length: "
                "is it a GGUF language model? Fix the space with --param num_gpu=... and num_ctx=..."
            )
        tag = next((t for t in self._list_tags() if t["name"] in (model, f"{model}:latest")), {})
        details = resp.details
        from tuner.memory import Architecture

        shape = Architecture.from_model_info(info)
        if not shape.vocab_size:
            # /api/show leaves the token list out unless asked verbosely: its length is the
            # vocabulary, which sizes the logits and the output layer.
            shape = Architecture.from_model_info({**info, **self._verbose_tokens(model)})
        return ModelInfo(
            name=model,
            architecture=arch,
            block_count=block,
            context_length=ctx,
            family=(details.family if details else "") or tag.get("family", ""),
            parameter_size=(details.parameter_size if details else "") or tag.get("parameter_size", ""),
            quantization=(details.quantization_level if details else "") or tag.get("quantization", ""),
            digest=tag.get("digest", ""),
            size_bytes=int(tag.get("size", 0)),
            arch=shape.to_dict(),
        )

    def _verbose_tokens(self, model: str) -> dict[str, Any]:
        """The token list of ``model`` from a verbose /api/show ({} when the server gives none)."""
        try:
            raw = self._call("/api/show", lambda: self._client._request_raw(
                "POST", "/api/show", json={"model": model, "verbose": True}), model=model)
            tokens = (raw.json().get("model_info") or {}).get("tokenizer.ggml.tokens")
        except (TunerError, ValueError, AttributeError):
            return {}
        return {"tokenizer.ggml.tokens": tokens} if isinstance(tokens, list) else {}

    def variants(self, model: str) -> list[str]:
        tags = self._list_tags(refresh=True)
        me = next((t for t in tags if t["name"] in (model, f"{model}:latest")), None)
        if me is None:
            return [model]
        base, _, tag = me["name"].partition(":")
        size_prefix = tag.split("-")[0] if tag and tag != "latest" else None
        out, digests = [model], {me["digest"]}
        for t in sorted(tags, key=lambda t: t["name"]):
            b, _, tg = t["name"].partition(":")
            if b != base or t["digest"] in digests or t["family"] != me["family"]:
                continue
            same_size = t["parameter_size"] == me["parameter_size"] and bool(me["parameter_size"])
            same_prefix = size_prefix is not None and (tg == size_prefix or tg.startswith(size_prefix + "-"))
            if same_prefix or (size_prefix is None and same_size):
                out.append(t["name"])
                digests.add(t["digest"])
        return out

    def ensure_models(self, models: list[str], echo: Echo) -> None:
        installed = {t["name"] for t in self._list_tags(refresh=True)}
        for m in models:
            if m in installed or f"{m}:latest" in installed:
                continue
            echo(f"pulling {m} ...")

            def pull(m: str = m) -> None:
                last = -10
                for p in self._client.pull(m, stream=True):
                    if p.total and p.completed is not None:
                        pct = int(100 * p.completed / p.total)
                        if pct >= last + 10 or pct == 100:
                            echo(f"  {m}: {p.status} {pct}%")
                            last = pct
                    elif p.status:
                        echo(f"  {m}: {p.status}")

            try:
                self._call(f"pull of {m}", pull, model=m)
            except LoadError as e:
                raise ModelNotFoundError(f"cannot pull '{m}': {e}; check the tag on ollama.com/library") from None
        self._list_tags(refresh=True)

    def loaded(self) -> list[dict[str, Any]]:
        """What /api/ps reports as loaded (size, size_vram, context_length)."""
        resp = self._call("/api/ps", self._client.ps)
        return [
            {"name": m.model or m.name or "", "size": int(m.size or 0), "size_vram": int(m.size_vram or 0),
             "context_length": getattr(m, "context_length", None)}
            for m in resp.models
        ]

    def _loaded_entry(self, model: str) -> dict[str, Any] | None:
        names = {model, f"{model}:latest"}
        return next((m for m in self.loaded() if m["name"] in names), None)

    def load(self, model: str, runner_options: dict[str, Any] | None) -> None:
        """Load ``model`` with ``runner_options`` without generating (an empty prompt)."""
        self._used.add(model)

        def run() -> None:
            self._client.generate(model=model, prompt="", options=runner_options or None, keep_alive=KEEP_ALIVE)

        self._call("a load request", run, model=model)

    def gpu_offload(self, model: str, runner_options: dict[str, Any] | None) -> GpuOffload:
        """Load the model as Ollama runs it by default and read /api/ps: size_vram > 0 is the
        server's own word that layers are on a GPU (any vendor, in a container or WSL too)."""
        try:
            self.load(model, runner_options)
            entry = self._loaded_entry(model)
            if self._loaded_before is not None and not ({model, f"{model}:latest"} & self._loaded_before):
                # Unloaded again, so the baseline trial measures its own load like every other trial.
                self.unload(model)
        except LoadError as e:
            return GpuOffload(True, "unknown", f"the defaults failed to load ({e}): num_gpu stays in the search")
        except ServerHungError:
            raise ServerError(
                f"the server is not generating: loading {model} with its defaults got no answer within --timeout "
                f"{self._timeout_s:g} s, though it answers /api/version; check the server's log (a hung runner, "
                "a stuck GPU), or raise --timeout if loads are this slow"
            ) from None
        if entry is None:
            return GpuOffload(True, "unknown", "/api/ps does not list the model after loading it: "
                                               "num_gpu stays in the search")
        vram, size = entry["size_vram"] / MIB, entry["size"] / MIB
        if entry["size_vram"] > 0:
            return GpuOffload(True, "ollama-ps", f"the server offloads to a GPU: /api/ps reports "
                                                 f"{vram:,.0f} of {size:,.0f} MiB in VRAM with its defaults")
        return GpuOffload(False, "ollama-ps", f"the server runs the model on the CPU: /api/ps reports "
                                              f"0 of {size:,.0f} MiB in VRAM with its defaults")

    def server_memory(self, model: str) -> ServerMemory | None:
        try:
            entry = self._loaded_entry(model)
        except (ServerError, LoadError):
            return None
        if entry is None:
            return None
        return ServerMemory(round(entry["size_vram"] / MIB, 1), round(entry["size"] / MIB, 1))

    def ran_options(self, model: str) -> dict[str, Any]:
        """The context /api/ps says the server allocated (the rest it does not report)."""
        try:
            entry = self._loaded_entry(model)
        except (ServerError, LoadError):
            return {}
        ctx = entry.get("context_length") if entry else None
        return {"num_ctx": int(ctx)} if isinstance(ctx, int) and ctx > 0 else {}

    def drafting(self, model: str) -> Drafting:
        """Ollama >= 0.31 drafts with a model's MTP heads, when /api/show says it has them."""
        version = str(self._server_info().get("version") or "")
        parsed = version_tuple(version)
        if parsed is None or parsed[:2] < DRAFT_MIN_VERSION:
            return Drafting(False, "", f"Ollama {version or '(unknown version)'} at {self.host} takes no "
                                       "draft_num_predict (Ollama 0.31 and later do)")
        resp = self._call("/api/show", lambda: self._client.show(model), model=model)
        why = mtp_evidence(dict(resp.modelinfo or {}), list(getattr(resp, "capabilities", None) or []))
        if not why:
            return Drafting(False, "", f"{model} has no multi-token-prediction heads (/api/show lists no "
                                       "<arch>.nextn_predict_layers and no MTP capability): nothing to draft with")
        return Drafting(True, "mtp", f"{model} drafts with its MTP heads ({why}); Ollama {version} takes "
                                     f"draft_num_predict per request (default {DRAFT_DEFAULT})",
                        default_lengths=DRAFT_LENGTHS, engine_default=DRAFT_DEFAULT)

    def greedy_pair(self, model: str, prompt: str, runner_options: dict[str, Any],
                    predict_options: dict[str, Any]) -> tuple[str, str] | None:
        """The text with the config's draft_num_predict and with 0 (per request: no reload)."""
        self._used.add(model)

        def text(extra: dict[str, Any]) -> str:
            options = {**runner_options, **predict_options, **extra}
            r = self._call("a generate request", lambda: self._client.generate(
                model=model, prompt=prompt, options=options, stream=False, keep_alive=KEEP_ALIVE), model=model)
            return str(r.response or "")

        return text({}), text({"draft_num_predict": 0})

    def snapshot_loaded(self) -> None:
        self._loaded_before = {m["name"] for m in self.loaded()}

    def restore_loaded(self) -> list[str]:
        """Unload (keep_alive 0) what the tuner loaded that was not loaded before the study."""
        if self._loaded_before is None or self.server is not None:
            return []
        out: list[str] = []
        try:
            now = {m["name"] for m in self.loaded()}
        except (ServerError, LoadError):
            return out
        used = self._used | {f"{m}:latest" for m in self._used}
        for name in sorted(now - self._loaded_before):
            if name not in used:
                continue
            try:
                self.unload(name)
                out.append(name)
            except (ServerError, LoadError):
                pass
        return out

    def unload(self, model: str) -> None:
        """Unload ``model`` now (an empty prompt with keep_alive 0)."""
        self._call(f"unload of {model}",
                   lambda: self._client.generate(model=model, prompt="", keep_alive=0), model=model)

    def create(self, name: str, source: str, parameters: dict[str, Any], echo: Echo) -> None:
        """Create model ``name`` from ``source`` with PARAMETER values (``ollama create``)."""

        def run() -> None:
            try:
                for p in self._client.create(model=name, from_=source, parameters=parameters, stream=True):
                    if p.status:
                        echo(f"  {p.status}")
            except self._ollama.ResponseError as e:
                if e.status_code != 404 or source in (e.error or ""):
                    raise
                # Not the source model missing: the endpoint itself is not there (old server, proxy).
                raise ServerError(
                    f"Ollama at {self.host} answered 404 Not Found to /api/create "
                    f"({(e.error or '').strip()[:80]}): this server, or a proxy in front of it, does not offer "
                    "model creation; write a Modelfile with `tune export --format modelfile -o Modelfile` "
                    f"and run `ollama create {name} -f Modelfile` on the server"
                ) from None

        try:
            self._call(f"create of {name}", run, model=source)
        except LoadError as e:
            raise ServerError(f"Ollama could not create '{name}': {e}") from None

    # -- measurement ---------------------------------------------------------------------
    def generate(
        self,
        model: str,
        prompt: str,
        runner_options: dict[str, Any] | None,
        predict_options: dict[str, Any],
    ) -> RequestSample:
        options = {**(runner_options or {}), **predict_options}
        self._used.add(model)

        def run() -> RequestSample:
            clock = _StreamClock(self.host, options.get("num_predict"), self._timeout_s)
            stream: Iterator[Any] = self._client.generate(
                model=model, prompt=prompt, options=options, stream=True, keep_alive=KEEP_ALIVE
            )
            for chunk in stream:
                clock.see(chunk)
            return clock.sample()

        return self._call("a generate request", run, model=model)

    def generate_concurrent(
        self,
        model: str,
        prompts: list[str],
        runner_options: dict[str, Any] | None,
        predict_options: dict[str, Any],
    ) -> tuple[list[RequestSample], float]:
        """Send the prompts as simultaneous streams (async client); return samples and wall ms."""
        import asyncio

        options = {**(runner_options or {}), **predict_options}
        self._used.add(model)

        async def one(client: Any, prompt: str) -> RequestSample:
            clock = _StreamClock(self.host, options.get("num_predict"), self._timeout_s)
            async for chunk in await client.generate(
                model=model, prompt=prompt, options=options, stream=True, keep_alive=KEEP_ALIVE
            ):
                clock.see(chunk)
            return clock.sample()

        async def run_all() -> tuple[list[RequestSample], float]:
            client = self._ollama.AsyncClient(host=self.host, timeout=self._timeout_s)
            t0 = time.perf_counter()
            try:
                out = await asyncio.gather(*(one(client, p) for p in prompts))
            finally:
                await client.close()
            return list(out), (time.perf_counter() - t0) * 1e3

        return self._call("concurrent generate requests", lambda: asyncio.run(run_all()), model=model)

    def prepare(self, server_settings: dict[str, Any]) -> bool:
        """Restart the managed server when a server-level setting changes."""
        if self.server is None:
            return False
        restarted = bool(self.server.ensure(server_settings))
        if restarted:
            self._tags = None
        return restarted

    def effective_server_settings(self, server_settings: dict[str, Any]) -> dict[str, Any] | None:
        """What the managed server really runs for these settings (old versions fall back)."""
        if self.server is None:
            return None
        return dict(self.server.effective(server_settings))

    def server_pids(self) -> list[int]:
        if self.server is not None:
            return [self.server.pid] if self.server.pid else []
        if not is_local(self.host):
            return []
        try:
            import psutil

            return [p.pid for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("ollama")]
        except Exception:
            return []

    def close(self) -> None:
        self._client.close()
        if self.server is not None:
            self.server.stop()


def create_model(name: str, source: str, parameters: dict[str, Any], echo: Echo, host: str | None = None,
                 announce: str = "", note: str = "") -> str:
    """Create model ``name`` from ``source`` with ``parameters`` on the server at ``host`` (None:
    $OLLAMA_HOST or the default), saying ``announce`` first; return what to tell the user, with
    ``note`` after it."""
    engine = OllamaEngine(host)
    try:
        if announce:
            echo(announce)
        engine.create(name, source=source, parameters=parameters, echo=echo)
    finally:
        engine.close()
    msg = f"created '{name}' on {engine.host}: `ollama run {name}` now uses the tuned settings"
    return f"{msg}; {note}" if note else msg
