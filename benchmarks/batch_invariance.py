"""Where llama.cpp's batched verification equals one-token-at-a-time decoding, on this machine.

    python benchmarks/batch_invariance.py [--contexts 64,200,320] [--batches 2,4,7,8,9] [--tokens 24]

Drafting keeps the greedy output only if a batch of tokens scored together gets the logits the
same tokens get one at a time. This measures that directly with the real Gemma 3 270M GGUF: for
each flash-attention setting, thread count and context length (tokens of the built-in document
before the generated text), greedy-generate ``--tokens`` tokens one at a time, then score the same
tokens again in batches of each size (the prompt's cache kept) and print the largest logit
difference (0 = bit-identical) and the first generated token whose greedy choice changes.
"""

from __future__ import annotations

import argparse

from _common import load_average, now_iso, table

from tuner.demo import demo_model_path
from tuner.engines.llamacpp import new_llama
from tuner.workload import builtin_prompts


def _measure(llm: object, prompt: list[int], tokens: int, batches: list[int]) -> list[str]:
    import numpy as np

    n_prompt = len(prompt)
    llm.reset()
    llm.eval(prompt)
    generated: list[int] = []
    for _ in range(tokens):
        generated.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([generated[-1]])
    one = np.array(llm.scores[n_prompt - 1:llm.n_tokens], dtype=np.float32)
    picks = one.argmax(axis=1)
    cells = []
    for size in batches:
        # Keep the prompt's cache: llama-cpp-python drops the cells past n_tokens before it decodes.
        llm.n_tokens = n_prompt
        for i in range(0, tokens, size):
            llm.eval(generated[i:i + size])
        batched = np.array(llm.scores[n_prompt - 1:llm.n_tokens], dtype=np.float32)
        diff = float(np.abs(one - batched).max())
        flips = np.nonzero(batched.argmax(axis=1) != picks)[0]
        cells.append("0" if diff == 0 else f"{diff:.2f}" + (f", flips {int(flips[0]) + 1}" if len(flips) else ""))
    return cells


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="64,200,320")
    ap.add_argument("--batches", default="2,4,7,8,9")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--threads", default="1,2")
    a = ap.parse_args(argv)
    contexts = [int(x) for x in a.contexts.split(",")]
    batches = [int(x) for x in a.batches.split(",")]
    import llama_cpp

    path = str(demo_model_path())
    document = next(p.text for p in builtin_prompts("default") if p.name == "document")
    print(f"{now_iso()}  batch-invariance benchmark; load average {load_average()}")
    rows = []
    for flash in (False, True):
        for threads in [int(x) for x in a.threads.split(",")]:
            llm = new_llama(llama_cpp, path, n_ctx=2048, n_batch=512, n_threads=threads, verbose=False,
                            logits_all=True, flash_attn=flash)
            try:
                words = llm.tokenize(document.encode())
                for ctx in contexts:
                    rows.append(["on" if flash else "off", threads, ctx + a.tokens,
                                 *_measure(llm, words[:ctx], a.tokens, batches)])
            finally:
                llm.close()
    print(table(["flash attention", "threads", "context at the end", *[f"batch {b}" for b in batches]], rows,
                f"largest logit difference, batched vs one token at a time (Gemma 3 270M Q4_K_M, {a.tokens} "
                "generated tokens; 'flips N': the greedy choice of generated token N changes, counted from 1)"))
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
