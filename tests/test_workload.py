from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuner.errors import WorkloadError
from tuner.workload import Workload, builtin_prompts, load_prompts, with_nonce


def test_builtin_prompts_short_chat_and_1k_document() -> None:
    chat, doc = builtin_prompts()
    assert len(chat.text.split()) < 80
    assert 700 <= len(doc.text.split()) <= 1000  # ~1k tokens


def test_nonce_is_unique_and_leads_the_prompt() -> None:
    a, b = with_nonce("hello"), with_nonce("hello")
    assert a != b and a.endswith("hello") and b.endswith("hello")
    assert a.split("\n")[0] != b.split("\n")[0]


def test_prompt_files(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("first\n---\nsecond\nline\n")
    assert [p.text for p in load_prompts(f)] == ["first", "second\nline"]
    j = tmp_path / "p.jsonl"
    j.write_text('{"name": "a", "prompt": "x"}\n\n{"name": "b", "prompt": "y"}\n')
    assert [(p.name, p.text) for p in load_prompts(j)] == [("a", "x"), ("b", "y")]
    j.write_text('{"nam": "a"}\n')
    with pytest.raises(WorkloadError, match="line 1"):
        load_prompts(j)


def test_workload_validation_and_fingerprint() -> None:
    with pytest.raises(WorkloadError, match="--repeats must be at least 1"):
        Workload(prompts=builtin_prompts(), repeats=0)
    a = Workload(prompts=builtin_prompts())
    assert a.fingerprint() == Workload(prompts=builtin_prompts()).fingerprint()
    assert a.fingerprint() != Workload(prompts=builtin_prompts(), num_predict=64).fingerprint()
    assert a.needed_context() > 1000


def test_stored_workload_replays_exactly(tmp_path: Path) -> None:
    f = tmp_path / "mine.txt"
    f.write_text("first prompt\n---\nsecond prompt\n", encoding="utf-8")
    custom = Workload(load_prompts(f), repeats=2, num_predict=7, source=str(f))
    stored = json.loads(json.dumps(custom.to_dict()))
    assert [p["text"] for p in stored["prompts"]] == ["first prompt", "second prompt"]
    assert Workload.from_dict(stored) == custom
    # The text is not part of the identity: studies stored before it was kept still resume.
    old = json.loads(json.dumps(stored))
    for p in old["prompts"]:
        del p["text"]
    assert Workload.from_dict(stored).fingerprint() == custom.fingerprint()
    with pytest.raises(WorkloadError, match="pass the original file with --prompts"):
        Workload.from_dict(old)
    builtin = Workload(builtin_prompts()).to_dict()
    for p in builtin["prompts"]:
        del p["text"]
    assert Workload.from_dict(builtin) == Workload(builtin_prompts())
