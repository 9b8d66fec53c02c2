"""The output-identity check of a drafting config (docs/drafting.md): greedy text with drafting
must equal the text without it. One function runs it, one stores its result, one says it in words.
"""

from __future__ import annotations

from typing import Any

from tuner.engines.base import Engine
from tuner.errors import TunerError
from tuner.workload import Workload


def check(engine: Engine, workload: Workload, model: str, runner: dict[str, Any], draft: int) -> dict[str, Any] | None:
    """Greedy text with this config's drafting against the text without it, on the workload's
    first prompt and its longest (whether a batch scores exactly as one token at a time can depend
    on the context's length); where they differ, the engine's batched-scoring control too. None
    when the engine cannot produce both texts."""
    prompts = [workload.prompts[0]]
    longest = max(workload.prompts, key=lambda p: len(p.text))
    if longest.text != prompts[0].text:
        prompts.append(longest)
    predict = {**workload.predict_options(), "temperature": 0.0, "seed": workload.seed}
    found: dict[str, Any] | None = None
    for i, prompt in enumerate(prompts):
        pair = engine.greedy_pair(model, prompt.text, runner, predict)
        if pair is None:
            break
        found = compare(prompt.name, draft, *pair)
        found["checked"] = [p.name for p in prompts[:i + 1]]
        if not found["identical"]:
            # Where the text differs, say whether batching alone (no drafter) does it. The control
            # only explains: its failure must not cost the config its measurement.
            try:
                control = engine.batched_scoring(model, prompt.text, runner, predict)
            except TunerError as e:
                control = {"error": str(e)}
            if control is not None:
                found["batched_scoring"] = control
            break
    return found


def violation(found: dict[str, Any] | None) -> str | None:
    """The violation of a check that failed, in words; None where it passed or did not run."""
    return text(found) if found is not None and not found["identical"] else None


def compare(prompt: str, draft: int, with_draft: str, without: str) -> dict[str, Any]:
    """The stored identity check: whether the texts match and, where not, where they part."""
    out: dict[str, Any] = {"identical": with_draft == without, "prompt": prompt, "draft_num_predict": draft,
                           "chars": len(without), "temperature": 0.0}
    if with_draft != without:
        i = next((k for k, (a, b) in enumerate(zip(with_draft, without)) if a != b), min(len(with_draft), len(without)))
        out["first_difference"] = i
        out["with_draft"] = with_draft[max(0, i - 30):i + 30]
        out["without"] = without[max(0, i - 30):i + 30]
    return out


def text(identity: dict[str, Any]) -> str:
    """The violation of a failed identity check, in words, with what the batched-scoring control
    says of its cause where it ran."""
    out = (f"drafting changed the output: greedy text on prompt '{identity.get('prompt')}' with "
           f"draft_num_predict={identity.get('draft_num_predict')} differs from the text without drafting "
           f"at character {identity.get('first_difference')} ({identity.get('with_draft')!r} vs "
           f"{identity.get('without')!r})")
    control = identity.get("batched_scoring")
    if not isinstance(control, dict) or control.get("error"):
        return out
    sizes = f"batches of 2 to {control.get('batch')} tokens (the sizes one verification evaluates)"
    if control.get("flips_at_token") is None:
        return (out + f"; scoring the text without drafting in {sizes}, from the end of the prompt on, changes no "
                f"greedy choice (logits differ by up to {control.get('max_logit_difference')}): batching at those "
                "offsets does not explain it")
    out += (f"; with no drafter at all, scoring the text without drafting in {sizes} already changes "
            f"the greedy choice at generated token {control.get('flips_at_token')} (batches of "
            f"{control.get('flip_batch')}; top two logits {control.get('top_two_gap')} apart): the engine "
            "computes a batch with other arithmetic than one token at a time")
    exact = _exact_batches(control.get("max_logit_difference_by_batch"))
    if exact:
        out += (f"; batches of up to {exact} tokens gave exactly the same logits, so draft_num_predict <= "
                f"{exact - 1} may keep the output")
    return out + " (docs/drafting.md)"


def _exact_batches(by_size: Any) -> int:
    """The largest batch size up to which every size from 2 scored bit-identically (0: none)."""
    if not isinstance(by_size, dict):
        return 0
    exact = 0
    for size in range(2, 2 + len(by_size)):
        if by_size.get(str(size)) != 0.0:
            break
        exact = size
    return exact
