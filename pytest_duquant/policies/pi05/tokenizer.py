"""PaliGemma SentencePiece tokenizer for pi0.5 prompts (openpi `models/tokenizer.py` PaligemmaTokenizer).

The tokenizer model is not inside checkpoints. Where it is taken from, first match wins:
  1. an explicit path (`--tokenizer`, `load_policy(tokenizer=...)`),
  2. the environment variable OPENPI_TOKENIZER,
  3. `<checkpoint>/tokenizer.model` (written by `duquant init-checkpoint`: a tiny SentencePiece model
     trained locally, NOT PaliGemma's; random-weight checkpoints only),
  4. openpi's download cache: `$OPENPI_DATA_HOME/big_vision/paligemma_tokenizer.model`
     (OPENPI_DATA_HOME defaults to ~/.cache/openpi).
Nothing is downloaded. A missing tokenizer is a CheckpointError naming every place looked at.

Prompt formats (verified against openpi and lerobot sources):
  - openpi, state not in the prompt (pi05_libero: discrete_state_input=False; also pi0):
      tokens = encode(clean(prompt), add_bos=True) + encode("\\n")
  - openpi, discrete state (pi05 default, e.g. pi05_droid):
      encode(f"Task: {clean}, State: {bins};\\nAction: ", add_bos=True)
  - lerobot pi05: the same "Task: ..., State: ...;\\nAction: " string (state always in the prompt),
      tokenized with BOS (lerobot uses the HF PaliGemma tokenizer; same SentencePiece vocabulary).
  clean(p) = p.strip().replace("_", " ").replace("\\n", " ");
  bins = digitize(state, linspace(-1, 1, 257)[:-1]) - 1
  on the *normalized* state. Tokens are right-padded with 0 to max_len (mask False), truncated beyond it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from pytest_duquant.policies.pi05.errors import CheckpointError

ENV_TOKENIZER = "OPENPI_TOKENIZER"
CKPT_TOKENIZER_NAME = "tokenizer.model"
log = logging.getLogger("duquant")


def openpi_cache_tokenizer_path() -> Path:
    home = Path(os.environ.get("OPENPI_DATA_HOME", "~/.cache/openpi")).expanduser()
    return home / "big_vision" / "paligemma_tokenizer.model"


def resolve_tokenizer_path(
    explicit: str | os.PathLike | None = None, ckpt_dir: str | os.PathLike | None = None
) -> Path:
    """The tokenizer model file to use (see module docstring for the order), or CheckpointError."""
    looked: list[str] = []
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.is_file():
            return path
        raise CheckpointError(f"tokenizer {path}: no such file (given explicitly)")
    env = os.environ.get(ENV_TOKENIZER)
    if env:
        path = Path(env).expanduser()
        if path.is_file():
            return path
        raise CheckpointError(f"{ENV_TOKENIZER}={env}: no such file")
    looked.append(f"{ENV_TOKENIZER} (unset)")
    if ckpt_dir is not None:
        path = Path(ckpt_dir) / CKPT_TOKENIZER_NAME
        if path.is_file():
            return path
        looked.append(str(path))
    cache = openpi_cache_tokenizer_path()
    if cache.is_file():
        return cache
    looked.append(str(cache))
    raise CheckpointError(
        "no PaliGemma tokenizer found (checkpoints do not contain it); looked at: "
        + "; ".join(looked)
        + f". Pass --tokenizer PATH or set {ENV_TOKENIZER} to paligemma_tokenizer.model "
        "(openpi downloads it from gs://big_vision/paligemma_tokenizer.model)."
    )


def clean_prompt(prompt: str) -> str:
    return prompt.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state: np.ndarray) -> np.ndarray:
    """openpi/lerobot: 256 bins over [-1, 1] of the normalized state."""
    return np.digitize(np.asarray(state), bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1


class PaligemmaTokenizer:
    """SentencePiece tokenizer producing (tokens int64[max_len], mask bool[max_len])."""

    def __init__(
        self, model_path: str | os.PathLike | None, max_len: int = 200, *, model_proto: bytes | None = None
    ):
        try:
            import sentencepiece
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise CheckpointError(
                "the pi0.5 tokenizer needs the 'sentencepiece' package (pip install sentencepiece)"
            ) from exc
        self.path = Path(model_path) if model_path is not None else "<in-memory tiny tokenizer>"
        self.max_len = int(max_len)
        try:
            proto = model_proto if model_proto is not None else Path(model_path).read_bytes()
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        except Exception as exc:
            raise CheckpointError(f"tokenizer {self.path}: not a SentencePiece model ({exc})") from exc

    @property
    def vocab_size(self) -> int:
        return int(self._sp.vocab_size())

    def prompt_ids(self, prompt: str, state: np.ndarray | None = None, fmt: str = "openpi") -> list[int]:
        cleaned = clean_prompt(prompt)
        if fmt == "lerobot" or state is not None:
            if state is None:
                raise ValueError("the lerobot pi0.5 prompt format needs the normalized state")
            state_str = " ".join(map(str, discretize_state(state)))
            return list(self._sp.encode(f"Task: {cleaned}, State: {state_str};\nAction: ", add_bos=True))
        return list(self._sp.encode(cleaned, add_bos=True)) + list(self._sp.encode("\n"))

    def tokenize(self, prompt: str, state: np.ndarray | None = None, fmt: str = "openpi"):
        ids = self.prompt_ids(prompt, state, fmt)
        n = len(ids)
        if n > self.max_len:
            log.warning("prompt has %d tokens, more than max_len %d: truncated", n, self.max_len)
            ids, n = ids[: self.max_len], self.max_len
        tokens = np.zeros(self.max_len, dtype=np.int64)
        tokens[:n] = ids
        mask = np.zeros(self.max_len, dtype=bool)
        mask[:n] = True
        return tokens, mask


# A corpus of LIBERO-like instructions for the tiny test tokenizer (plus digits for state bins).
_TINY_CORPUS = [
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "put both the alphabet soup and the tomato sauce in the basket",
    "open the middle drawer of the cabinet",
    "turn on the stove and put the moka pot on it",
    "put the cream cheese in the bowl",
    "push the plate to the front of the stove",
    "put the wine bottle on top of the cabinet",
    "pick up the ketchup and place it in the basket",
    "Task: do something, State: 0 12 127 255 64 200 3 99;\nAction: ",
] + [" ".join(str(i) for i in range(k, 256, 7)) for k in range(7)]


def train_tiny_tokenizer(out_path: str | os.PathLike, vocab_size: int = 300) -> Path:
    """Train a small SentencePiece model (deterministic, single thread) for tests and random checkpoints."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(tiny_tokenizer_proto(vocab_size))
    return out


def tiny_tokenizer_proto(vocab_size: int = 300) -> bytes:
    """The serialized tiny SentencePiece model (about 110 pieces; ids: pad 0, eos 1, bos 2, unk 3)."""
    return train_sentencepiece(_TINY_CORPUS * 20, vocab_size, model_type="unigram")


def train_sentencepiece(sentences, vocab_size: int, *, model_type: str = "unigram", **options) -> bytes:
    """A serialized SentencePiece model with PaliGemma's special ids (pad 0, eos 1, bos 2, unk 3) and "\n" as
    a piece, trained deterministically (one thread, the sentences in the given order)."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        num_threads=1,
        bos_id=2,
        eos_id=1,
        unk_id=3,
        pad_id=0,
        user_defined_symbols=["\n"],
        hard_vocab_limit=False,
        remove_extra_whitespaces=False,
        minloglevel=2,
        **options,
    )
    return buf.getvalue()
