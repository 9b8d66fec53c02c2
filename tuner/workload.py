"""The workload a trial runs: fixed prompts, repeats and generation length."""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from tuner.errors import WorkloadError

#: Tokens added by a chat template around the prompt, plus the nonce; a safe upper bound.
TEMPLATE_TOKENS = 32
#: Characters per token used to size num_ctx before the model has tokenised anything.
#: English text runs ~4 characters per token on Gemma/Llama tokenizers; 3 errs on the safe side.
CHARS_PER_TOKEN = 3.0


@dataclass(frozen=True)
class Prompt:
    """One measured prompt."""

    name: str
    text: str

    def estimated_tokens(self) -> int:
        return math.ceil(len(self.text) / CHARS_PER_TOKEN) + TEMPLATE_TOKENS


@dataclass(frozen=True)
class Workload:
    """What every trial measures: each prompt ``repeats`` times, ``num_predict`` tokens each."""

    prompts: tuple[Prompt, ...]
    repeats: int = 3
    num_predict: int = 128
    seed: int = 42
    temperature: float = 0.0
    warmup_predict: int = 8
    source: str = "builtin"
    concurrency: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.repeats <= 0:
            raise WorkloadError(f"--repeats must be at least 1 (got {self.repeats})")
        if self.num_predict <= 0:
            raise WorkloadError(f"--num-predict must be at least 1 (got {self.num_predict})")
        if self.concurrency < 1:
            raise WorkloadError(f"--concurrency must be at least 1 (got {self.concurrency})")
        if not self.prompts:
            raise WorkloadError("the workload has no prompts: give a non-empty --prompts file")

    def needed_context(self) -> int:
        """Tokens the longest prompt plus the generated tokens need."""
        return max(p.estimated_tokens() for p in self.prompts) + self.num_predict

    def predict_options(self) -> dict[str, Any]:
        """Per-request (no reload) options sent with every measured request."""
        return {"num_predict": self.num_predict, "temperature": self.temperature, "seed": self.seed}

    def to_dict(self) -> dict[str, Any]:
        """The stored form: every field, and each prompt's text with its size and hash (the text
        is small and lets ``tune check`` and warm starts replay a custom --prompts file exactly)."""
        d = asdict(self)
        d["prompts"] = [{"name": p.name, "chars": len(p.text), "sha256": _sha(p.text), "text": p.text}
                        for p in self.prompts]
        return d

    def fingerprint(self) -> str:
        """What must match to resume a study; the text is represented by its hash (studies stored
        before the text was kept resume unchanged)."""
        d = self.to_dict()
        d.pop("source", None)
        for p in d["prompts"]:
            p.pop("text", None)
        return _sha(json.dumps(d, sort_keys=True))[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Workload:
        """The workload a study stored (:meth:`to_dict`), exactly as it was measured.

        Studies stored before the prompt text was kept name only hashes: the built-in prompts
        are recognised by their hash; anything else raises WorkloadError naming the fix.
        """
        builtin = {_sha(p.text): p for p in all_builtin_prompts()}
        prompts: list[Prompt] = []
        for item in d.get("prompts") or []:
            text = item.get("text")
            if isinstance(text, str) and (not item.get("sha256") or _sha(text) == item["sha256"]):
                prompts.append(Prompt(str(item.get("name", f"p{len(prompts) + 1}")), text))
            elif item.get("sha256") in builtin:
                prompts.append(Prompt(str(item.get("name")), builtin[item["sha256"]].text))
            else:
                raise WorkloadError(
                    f"the study stored no text for prompt '{item.get('name')}' (it was created before prompts "
                    "were stored): pass the original file with --prompts"
                )
        known = {f.name for f in fields(cls)} - {"prompts"}
        return cls(prompts=tuple(prompts), **{k: v for k, v in d.items() if k in known})


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


#: The built-in workloads (``--prompts builtin:NAME``): the prompt names of each. ``copy`` is a
#: code edit whose answer mostly copies the prompt (drafting from the prompt pays); ``chat`` is
#: free text (little to draft from).
BUILTIN_WORKLOADS = {"default": ("chat", "document"), "copy": ("code_edit",), "chat": ("chat",)}
#: How a --prompts value names a built-in workload.
BUILTIN_PREFIX = "builtin:"


def _builtin(name: str) -> Prompt:
    base = resources.files("tuner") / "prompts"
    return Prompt(name, (base / f"{name}.txt").read_text(encoding="utf-8").strip())


def builtin_prompts(workload: str = "default") -> tuple[Prompt, ...]:
    """A built-in workload's prompts; the default: a short chat prompt and a ~1k-token document."""
    if workload not in BUILTIN_WORKLOADS:
        raise WorkloadError(f"unknown built-in workload '{workload}': choose from "
                            + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_WORKLOADS))
    return tuple(_builtin(n) for n in BUILTIN_WORKLOADS[workload])


def all_builtin_prompts() -> tuple[Prompt, ...]:
    """Every built-in prompt once."""
    return tuple(_builtin(n) for n in dict.fromkeys(n for names in BUILTIN_WORKLOADS.values() for n in names))


def workload_prompts(source: str | Path | None) -> tuple[Prompt, ...]:
    """The prompts ``--prompts`` names: a file, ``builtin:NAME``, or (None) the default built-ins."""
    if source is None:
        return builtin_prompts()
    if str(source).startswith(BUILTIN_PREFIX):
        return builtin_prompts(str(source)[len(BUILTIN_PREFIX):])
    return load_prompts(source)


def load_prompts(path: str | Path) -> tuple[Prompt, ...]:
    """Read prompts from a file.

    ``.jsonl``: one ``{"name": ..., "prompt": ...}`` per line. Any other file: prompts
    separated by lines holding only ``---``.
    """
    from tuner.inputs import MAX_PROMPTS_BYTES, read_text

    p = Path(path)
    text = read_text(p, "prompts file", MAX_PROMPTS_BYTES, WorkloadError, "--prompts")
    prompts: list[Prompt] = []
    if p.suffix == ".jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                prompts.append(Prompt(str(obj.get("name", f"p{len(prompts) + 1}")), str(obj["prompt"])))
            except (ValueError, KeyError, AttributeError):
                raise WorkloadError(
                    f'prompts file {p} line {i}: expected {{"name": ..., "prompt": ...}}'
                ) from None
    else:
        chunks: list[str] = []
        cur: list[str] = []
        for line in text.splitlines():
            if line.strip() == "---":
                chunks.append("\n".join(cur))
                cur = []
            else:
                cur.append(line)
        chunks.append("\n".join(cur))
        prompts = [Prompt(f"p{i + 1}", c.strip()) for i, c in enumerate(c for c in chunks if c.strip())]
    prompts = [pr for pr in prompts if pr.text.strip()]
    if not prompts:
        raise WorkloadError(
            f"prompts file {p} holds no prompt: write prompts separated by '---' lines"
        )
    return tuple(prompts)


def with_nonce(text: str) -> str:
    """Prefix a unique nonce so no server-side prompt cache can serve any of the prompt."""
    return f"[request {uuid.uuid4().hex[:12]}]\n{text}"
