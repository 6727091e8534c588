"""A byte-level BPE tokenizer (GPT-2/RoBERTa style) built on Hugging Face ``tokenizers``.

Byte-level BPE never needs ``<unk>``: every string is first mapped to bytes, so any text, in any
script, round-trips exactly (``decode(encode(t)) == t``). The special tokens take ids 0..4 in
fairseq/RoBERTa order (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>`` 4), so the model
can rely on those ids without asking the tokenizer.

Everything here is local: a tokenizer is trained from an iterable of strings or loaded from a
``tokenizer.json`` file; nothing is ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data2vec.errors import ConfigError, DataError, DataNotFoundError

SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
"""Special tokens; their position in this tuple is their id."""

TOKENIZER_FILE = "tokenizer.json"
"""The file name a tokenizer is saved under inside a directory."""

_BYTE_ALPHABET = 256
MIN_VOCAB_SIZE = _BYTE_ALPHABET + len(SPECIAL_TOKENS)
"""The smallest vocabulary that holds every byte and the special tokens (no merges)."""


class TextTokenizer:
    """Byte-level BPE with the special tokens at ids 0..4.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` whose vocabulary maps :data:`SPECIAL_TOKENS` to
            ids 0..4 (checked).
        origin: where it came from, for error messages.

    Raises:
        DataError: the special tokens are missing or at other ids.
    """

    def __init__(self, tokenizer: Tokenizer, origin: str = "<memory>") -> None:
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if ids != list(range(len(SPECIAL_TOKENS))):
            found = ", ".join(f"{t}={i}" for t, i in zip(SPECIAL_TOKENS, ids))
            raise DataError(
                f"{origin}: special tokens must have ids 0..4 in the order "
                f"{' '.join(SPECIAL_TOKENS)}; found {found}"
            )
        # A literal "</s>" or "<mask>" inside a document (web text has them) must stay text: if it
        # became the special id, a corpus could forge document boundaries or mask tokens. This
        # flag is not saved in tokenizer.json, so it is set on every construction.
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self.origin = origin

    def __getstate__(self) -> dict:
        return {"json": self._tok.to_str(), "origin": self.origin}

    def __setstate__(self, state: dict) -> None:
        # Through __init__: a pickled Tokenizer forgets encode_special_tokens (DataLoader
        # workers started with "spawn" would then turn a literal "</s>" into the eos id).
        self.__init__(Tokenizer.from_str(state["json"]), state["origin"])

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> TextTokenizer:
        """Learn byte-level BPE merges from a stream of texts.

        Args:
            texts: documents, consumed once, lazily (the corpus is never held in memory).
            vocab_size: the largest vocabulary, special tokens and the 256 bytes included; a
                small corpus can give fewer (no pair frequent enough to merge).
            min_frequency: a pair must occur this often to be merged.

        Raises:
            ConfigError: ``vocab_size`` below 261 (256 bytes + 5 special tokens).
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(
                f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
                f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
            )
        tok = Tokenizer(models.BPE())
        # No prefix space: GPT-2/RoBERTa behaviour, and the only setting under which decoding
        # gives back the text exactly (a prefix space would add a leading " " on the way back).
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),  # first, so they get ids 0..4
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all bytes, seen or not
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok, origin="<trained>")

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """Load a tokenizer from ``path/tokenizer.json`` or from the ``.json`` file itself.

        Raises:
            DataNotFoundError: no such file.
            DataError: the file is not a valid tokenizer, or its special tokens are wrong.
        """
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise DataNotFoundError(
                f"tokenizer not found: {file} (expected a {TOKENIZER_FILE} file or a directory "
                f"containing one)"
            )
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise DataError(f"{file}: not a valid tokenizer file: {e}") from None
        return cls(tok, origin=str(file))

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer to ``path`` (a ``.json`` file, else a directory that gets a
        ``tokenizer.json``); returns the file written. The write is atomic."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / TOKENIZER_FILE
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(file.name + ".tmp")
        tmp.write_text(self._tok.to_str(), encoding="utf-8")
        os.replace(tmp, file)  # a reader never sees a half-written tokenizer
        return file

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (ids are ``0 .. vocab_size - 1``)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._tok.token_to_id("<s>")

    @property
    def pad_id(self) -> int:
        return self._tok.token_to_id("<pad>")

    @property
    def eos_id(self) -> int:
        return self._tok.token_to_id("</s>")

    @property
    def unk_id(self) -> int:
        return self._tok.token_to_id("<unk>")

    @property
    def mask_id(self) -> int:
        return self._tok.token_to_id("<mask>")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of many texts at once (parallel in Rust, no offsets computed)."""
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; special tokens are dropped."""
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def encode_for_model(self, text: str, max_len: int) -> list[int]:
        """``[<s>] + ids[: max_len - 2] + [</s>]``: one sequence of at most ``max_len`` ids.

        Raises:
            ConfigError: ``max_len`` < 3 (no room for a single token).
        """
        if max_len < 3:
            raise ConfigError(f"max_len={max_len} must be at least 3 (<s>, one token, </s>)")
        return [self.bos_id, *self.encode(text)[: max_len - 2], self.eos_id]

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, origin={self.origin!r})"
