"""The small interface every inference engine implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

from tuner.metrics import RequestSample
from tuner.record import ServerMemory as ServerMemory

Echo = Callable[[str], None]


@dataclass(frozen=True)
class ModelInfo:
    """What the tuner needs to know about a model to build its search space."""

    name: str
    architecture: str
    block_count: int
    context_length: int
    family: str = ""
    parameter_size: str = ""
    quantization: str = ""
    digest: str = ""
    size_bytes: int = 0
    #: The architecture numbers the memory model needs (tuner.memory.Architecture.to_dict()).
    arch: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GpuOffload:
    """Whether the engine offloads layers to a GPU, and the evidence that decided it."""

    offloads: bool
    #: What decided: "ollama-ps" (the server's /api/ps size_vram), "nvml", "llama.cpp",
    #: "recorded grid", "--param num_gpu" or "unknown".
    source: str
    #: One line for the terminal: what was seen.
    detail: str


@dataclass(frozen=True)
class Drafting:
    """Whether the engine can draft tokens for a model (speculative decoding), and why."""

    available: bool
    #: "mtp" (Ollama: the model's built-in multi-token-prediction heads) or "prompt-lookup"
    #: (llama-cpp-python's LlamaPromptLookupDecoding); "" when not available.
    method: str
    #: One line for the terminal: what was seen.
    detail: str
    #: Draft lengths searched without --param (empty: only when asked for).
    default_lengths: tuple[int, ...] = ()
    #: The engine's own draft length when no option is sent (Ollama's 4 on an MTP model).
    engine_default: int = 0


#: Draft lengths searched by default where a model drafts by default (0 = drafting off).
DRAFT_LENGTHS = tuple(range(0, 9))


class Engine(ABC):
    """Loads a model with a configuration and runs one streamed, timed request."""

    name: str = "engine"
    #: Whether the server runs on this machine (so this machine's GPUs and processes are its).
    local: bool = True
    #: Whether ``server_memory`` reports the VRAM a loaded model uses (for --max-vram-mib).
    reports_server_memory: bool = False
    #: Parameters of the search space this engine can apply.
    supported_params: tuple[str, ...] = ()
    #: Whether sliding-window layers keep the whole context (llama-cpp-python's default;
    #: llama-server, which Ollama runs, keeps only the window): the memory model's KV cache.
    swa_full_cache: bool = False

    @abstractmethod
    def server_info(self) -> dict[str, Any]:
        """Engine/server identity and version, recorded with the study."""

    @abstractmethod
    def model_info(self, model: str) -> ModelInfo:
        """Architecture facts of ``model``; raises ModelNotFoundError if absent."""

    @abstractmethod
    def variants(self, model: str) -> list[str]:
        """Locally available quantization variants of ``model`` (itself first)."""

    def ensure_models(self, models: list[str], echo: Echo) -> None:
        """Make the given variants available (pull them), showing progress."""

    def gpu_offload(self, model: str, runner_options: dict[str, Any] | None) -> GpuOffload:
        """Decide whether ``model`` (with ``runner_options``) runs on a GPU, and say why.

        Engines that can ask the server what it did override this; the default asks NVML.
        """
        from tuner.telemetry import probe_gpus

        probe = probe_gpus()
        if probe.available:
            return GpuOffload(True, "nvml", f"NVML sees {len(probe.gpus)} NVIDIA GPU(s)")
        return GpuOffload(False, "nvml", f"no GPU: {probe.reason}")

    def server_memory(self, model: str) -> ServerMemory | None:
        """Memory the server reports for the loaded ``model``; None when the engine cannot tell."""
        return None

    def ran_options(self, model: str) -> dict[str, Any]:
        """The runner options the loaded ``model`` runs with, as the engine reports them (the
        defaults resolved), by setting name; {} when the engine cannot tell."""
        return {}

    def drafting(self, model: str) -> Drafting:
        """Whether ``model`` can draft tokens on this engine; the default: it cannot."""
        return Drafting(False, "", f"the {self.name} engine does not draft tokens")

    def greedy_pair(self, model: str, prompt: str, runner_options: dict[str, Any],
                    predict_options: dict[str, Any]) -> tuple[str, str] | None:
        """The text generated for ``prompt`` with the drafting of ``runner_options`` and with
        drafting off (the rest the same, no reload where the engine can avoid one), for the
        output-identity check; None when the engine cannot produce both."""
        return None

    def batched_scoring(self, model: str, prompt: str, runner_options: dict[str, Any],
                        predict_options: dict[str, Any]) -> dict[str, Any] | None:
        """The control of a failed identity check: the greedy text without drafting scored again
        in batches as large as a verification (draft length + 1), with no drafter at all; where
        a batch's greedy choice differs from the one-token-at-a-time choice, the engine's batched
        arithmetic alone changes the output. None when the engine gives no logits."""
        return None

    def snapshot_loaded(self) -> None:
        """Remember what the server has loaded now, so ``restore_loaded`` can leave it so."""

    def restore_loaded(self) -> list[str]:
        """Unload what the tuner loaded since ``snapshot_loaded``; return those names."""
        return []

    def prepare(self, server_settings: dict[str, Any]) -> bool:
        """Apply server-level settings; return True if the server was restarted."""
        return False

    @abstractmethod
    def generate(
        self,
        model: str,
        prompt: str,
        runner_options: dict[str, Any] | None,
        predict_options: dict[str, Any],
    ) -> RequestSample:
        """Run one streamed request; ``runner_options=None`` sends none (engine defaults)."""

    def generate_concurrent(
        self,
        model: str,
        prompts: list[str],
        runner_options: dict[str, Any] | None,
        predict_options: dict[str, Any],
    ) -> tuple[list[RequestSample], float]:
        """Run the prompts as simultaneous streams; return the samples and the wall time (ms).

        Engines without concurrency run them one after another.
        """
        import time

        t0 = time.perf_counter()
        out = [self.generate(model, p, runner_options, predict_options) for p in prompts]
        return out, (time.perf_counter() - t0) * 1e3

    def server_pids(self) -> list[int]:
        """PIDs of the local server process(es), for host telemetry."""
        return []

    def close(self) -> None:
        """Release what the engine holds (models, managed server)."""
