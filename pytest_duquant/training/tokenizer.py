"""A small SentencePiece vocabulary for a policy trained on LIBERO prompts (the reference variant).

PaliGemma's 257,152-token embedding alone would be ~250 MB at width 256 in float32, so the reference
policy brings its own vocabulary: a unigram SentencePiece model trained on the task prompts it sees,
in the exact prompt format pi0.5 tokenizes (``Task: <prompt>, State: <8 bins>;\\nAction: `` with
openpi's discrete state), plus every state bin 0..255 as a piece. Ids: pad 0, eos 1, bos 2, unk 3, as
PaliGemma's. Training is deterministic (one thread, fixed corpus order); the file ships with the
checkpoint as ``tokenizer.model`` and the policy loads it like any tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pytest_duquant.policies.pi05.tokenizer import clean_prompt, train_sentencepiece

BINS = 256


def prompt_corpus(prompts: Iterable[str], *, states_per_prompt: int = 40, seed: int = 0) -> list[str]:
    """Sentences in pi0.5's discrete-state prompt format, each prompt with random state bins."""
    rng = np.random.default_rng(seed)
    out = []
    for prompt in sorted({clean_prompt(p) for p in prompts}):
        for _ in range(states_per_prompt):
            bins = " ".join(str(int(b)) for b in rng.integers(0, BINS, size=8))
            out.append(f"Task: {prompt}, State: {bins};\nAction: ")
    return out


def train_prompt_tokenizer(prompts: Iterable[str], vocab_size: int = 512) -> bytes:
    """Serialized SentencePiece model for these prompts; its vocabulary size is at most `vocab_size`."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("train_prompt_tokenizer: no prompts given")
    # BPE: whole words on so small a corpus; no NFKC table in the file (~240 KB): prompts are ASCII
    return train_sentencepiece(prompt_corpus(prompts), vocab_size, model_type="bpe",
                               normalization_rule_name="identity")


def write_prompt_tokenizer(prompts: Iterable[str], out_path: str | Path, vocab_size: int = 512) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(train_prompt_tokenizer(prompts, vocab_size))
    return out
