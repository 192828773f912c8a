"""The tokenizer: a prompt becomes 77 integers, CLIP's way.

Stable Diffusion v1.x reads its prompt with CLIP ViT-L/14's tokenizer (Radford et al.
2021), a byte-level byte-pair encoding (BPE, Sennrich et al. 2016) with 49,408 tokens.
minisd uses the same algorithm and the same file formats, with a vocabulary trained on its
own captions (a few hundred tokens instead of 49,408). Step by step, for
"A small Red circle!":

 1. normalise: Unicode NFC, every run of whitespace becomes one space, lower-case
        "a small red circle!"
 2. pre-tokenise into words with CLIP's pattern (contractions 's 't 're 've 'm 'll 'd;
    runs of letters; single digits; runs of other non-space characters); spaces vanish
        "a" "small" "red" "circle" "!"
 3. bytes to symbols: each UTF-8 byte becomes one printable character (GPT-2's map:
    printable bytes stand for themselves, the rest are shifted to U+0100 and up), so
    every string can be written with 256 symbols and nothing is ever unknown ("é" is two
    bytes, "Ã©")
 4. BPE: start from single symbols, the last one of each word marked with "</w>"
    (end of word: "a</w>" is the word "a", "a" is a word-initial a), and apply the learned
    merges in the order they were learned, until none applies
        "a</w>" "small</w>" "red</w>" "circle</w>" "!</w>"
 5. ids, framed by <|startoftext|> ... <|endoftext|>, cut at 77 (with a warning) and
    padded with <|endoftext|> to 77:
        [bos, a, small, red, circle, !, eos, eos, eos, ...]

The vocabulary is laid out as CLIP's: the 256 byte symbols, the same 256 with "</w>",
one token per merge in merge order, then <|startoftext|> and <|endoftext|> (in SD:
ids 0-255, 256-511, 512-49405, 49406, 49407). Files: ``tokenizer.json`` (the
`tokenizers` library's format, what transformers 5 saves) and ``vocab.json`` +
``merges.txt`` (what SD v1.x folders carry); both load, and give the ids that
transformers' CLIPTokenizer gives (padding="max_length", max_length=77, truncation=True).
OpenAI's original CLIP code also repaired mojibake (ftfy) and unescaped HTML entities
first; transformers' CLIPTokenizer does not, and neither does minisd.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_LENGTH = 77  # CLIP's context length: SD's text encoder has 77 position embeddings
# CLIP's word pattern, and its two special tokens kept whole if a prompt spells them out.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_symbols() -> dict[int, str]:
    """GPT-2 / CLIP's map from the 256 byte values to 256 printable characters, in CLIP's vocab order.

    Bytes that print (! to ~, the Latin-1 letters and signs except the soft hyphen) keep
    their own character; the other 68 (space, controls, ...) get U+0100, U+0101, ... in order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    symbols = {b: chr(b) for b in keep}
    symbols.update({b: chr(256 + i) for i, b in enumerate(moved)})
    return symbols


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary for a list of merges: bytes, bytes + "</w>", one token per merge, specials."""
    base = list(bytes_to_symbols().values())
    tokens = base + [s + END_OF_WORD for s in base] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("merges produce a token twice; not a valid BPE merge list")
    return vocab


def _pipeline(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """A `tokenizers.Tokenizer` doing steps 1-5 of the module docstring (no padding)."""
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    for special in (BOS, EOS):
        if special not in vocab:
            raise ValueError(f"the vocabulary has no {special} token; not a CLIP tokenizer")
    tk = HFTokenizer(BPE(vocab=vocab, merges=merges, end_of_word_suffix=END_OF_WORD, continuing_subword_prefix="",
                         unk_token=EOS, fuse_unk=False, dropout=None))
    tk.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                          normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        # invert=True: the pattern's matches are the words; what lies between them (spaces) is dropped
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),  # its own GPT-2 split finds nothing more to cut
    ])
    tk.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}",
                                                      special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    tk.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace(END_OF_WORD, " ")])
    tk.add_special_tokens([AddedToken(BOS, special=True), AddedToken(EOS, special=True)])
    return tk


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def _token_name(value):
    """special_tokens_map.json writes a token as "x" or as {"content": "x", ...}."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """CLIP's byte-level BPE tokenizer, built with the `tokenizers` library.

    ``tok(prompts)`` -> int64 (N, 77) ids; ``Tokenizer.train(captions)`` learns one,
    ``Tokenizer.from_folder(path)`` loads one (tokenizer.json, or vocab.json + merges.txt,
    in the folder or its tokenizer/ subfolder), ``tok.save(folder)`` writes both forms.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int = MAX_LENGTH,
                 pad_token: str = EOS):
        if not isinstance(max_length, (int, np.integer)) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2 (room for the start and end tokens), "
                             f"got {max_length!r}")
        if pad_token not in vocab:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.max_length = int(max_length)
        self.pad_token = pad_token
        self._tk = _pipeline(self.vocab, self.merges)
        self.bos_id, self.eos_id, self.pad_id = vocab[BOS], vocab[EOS], vocab[pad_token]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, max_length={self.max_length})"

    # -- learning one -----------------------------------------------------------------------

    @classmethod
    def train(cls, captions, vocab_size: int = 1024, min_frequency: int = 2, max_length: int = MAX_LENGTH):
        """Learn BPE merges from captions (most frequent adjacent pair first, as the `tokenizers`
        trainer counts them) until the vocabulary has ``vocab_size`` tokens or no pair occurs
        ``min_frequency`` times. The 514 fixed tokens (bytes, bytes + "</w>", two specials)
        count towards vocab_size; SD's CLIP learned 48,894 merges on 400M captions."""
        from tokenizers import trainers

        captions = [captions] if isinstance(captions, str) else list(captions)
        if not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError("captions must be a non-empty list of strings")
        fixed = 2 * 256 + 2
        if not isinstance(vocab_size, (int, np.integer)) or vocab_size < fixed:
            raise ValueError(f"vocab_size must be at least {fixed} (256 bytes, 256 bytes + </w>, 2 specials), "
                             f"got {vocab_size!r}")
        scratch = _pipeline({BOS: 0, EOS: 1}, [])
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size + fixed,  # the trainer counts its own alphabet; we cut the merges below
            min_frequency=min_frequency, show_progress=False, end_of_word_suffix=END_OF_WORD,
            initial_alphabet=list(bytes_to_symbols().values()), special_tokens=[BOS, EOS])
        scratch.train_from_iterator(captions, trainer)
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                  for m in json.loads(scratch.to_str())["model"]["merges"]][: vocab_size - fixed]
        return cls(clip_vocab(merges), merges, max_length)

    # -- files --------------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, path: str, max_length: int | None = None):
        """Load ``path`` (or ``path``/tokenizer): tokenizer.json, else vocab.json + merges.txt.

        tokenizer_config.json / special_tokens_map.json, when present, give the pad token
        (SD v1.x: <|endoftext|>; SD 2.x pads with "!") and model_max_length (77).
        """
        folder = path
        if not os.path.isdir(folder):
            raise ValueError(f"tokenizer folder {path!r} does not exist")
        if os.path.isdir(os.path.join(folder, "tokenizer")):
            folder = os.path.join(folder, "tokenizer")
        json_path = os.path.join(folder, "tokenizer.json")
        vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        if os.path.isfile(json_path):
            model = _read_json(json_path).get("model", {})
            if model.get("type") != "BPE" or "vocab" not in model:
                raise ValueError(f"{json_path} is not a BPE tokenizer (model type {model.get('type')!r})")
            vocab = model["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        elif os.path.isfile(vocab_path) and os.path.isfile(merges_path):
            vocab = _read_json(vocab_path)
            with open(merges_path, encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f]
            merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
            bad = [m for m in merges if len(m) != 2]
            if bad:
                raise ValueError(f"{merges_path}: a merge is two symbols separated by one space, "
                                 f"got {' '.join(bad[0])!r}")
        else:
            raise ValueError(f"no tokenizer in {folder}: expected tokenizer.json or vocab.json + merges.txt")
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if os.path.isfile(os.path.join(folder, name)):
                config.update(_read_json(os.path.join(folder, name)))
        pad = _token_name(config.get("pad_token")) or EOS
        if max_length is None:
            max_length = config.get("model_max_length", MAX_LENGTH)
            max_length = max_length if isinstance(max_length, int) and max_length <= 4096 else MAX_LENGTH
        return cls(vocab, merges, max_length, pad_token=pad)

    def save(self, folder: str) -> str:
        """Write tokenizer.json (padding and truncation included, so that
        ``tokenizers.Tokenizer.from_file`` alone gives the same 77 ids), vocab.json,
        merges.txt and transformers' tokenizer_config.json / special_tokens_map.json."""
        from minisd.io import atomic_write, write_json, write_text

        os.makedirs(folder, exist_ok=True)
        tk = _pipeline(self.vocab, self.merges)
        tk.enable_truncation(self.max_length)
        tk.enable_padding(length=self.max_length, pad_id=self.pad_id, pad_token=self.pad_token)
        # each file atomically (a new one whole, or the old one untouched), as the weights
        atomic_write(os.path.join(folder, "tokenizer.json"), tk.save)
        write_json(os.path.join(folder, "vocab.json"), self.vocab, indent=None)
        merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges)
        write_text(os.path.join(folder, "merges.txt"), merges)
        specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": self.pad_token}
        write_json(os.path.join(folder, "special_tokens_map.json"), specials)
        write_json(os.path.join(folder, "tokenizer_config.json"),
                   {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length,
                    "do_lower_case": True, **specials})
        return folder

    # -- using it -----------------------------------------------------------------------------

    def __call__(self, prompts) -> np.ndarray:
        """Prompt(s) -> int64 (N, max_length): [bos, tokens ..., eos, pad ...].

        A prompt with more than max_length - 2 tokens keeps its first max_length - 2 and
        still ends with eos; it is truncated with a warning (SD ignores anything past 77).
        The empty prompt is [bos, eos, pad ...]: SD's unconditional input for guidance.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a string or a list of strings")
        out = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)
        for i, enc in enumerate(self._tk.encode_batch(prompts)):
            ids = enc.ids
            if len(ids) > self.max_length:
                warnings.warn(f"prompt {i} has {len(ids) - 2} tokens, more than the {self.max_length - 2} "
                              f"that fit in {self.max_length}; truncated: {prompts[i][:40]!r}...", stacklevel=2)
                ids = ids[: self.max_length - 1] + [self.eos_id]
            out[i, : len(ids)] = ids
        return out

    encode = __call__

    def tokenize(self, prompt: str) -> list[str]:
        """The BPE pieces of a prompt, without start and end tokens:
        "a red circle" -> ["a</w>", "red</w>", "circle</w>"]."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        return self._tk.encode(prompt, add_special_tokens=False).tokens

    def decode(self, ids) -> str:
        """Ids (one row) back to text, up to the first end token. Lossy as CLIP's is:
        lower-cased, spaces only between words ("hello, world" -> "hello , world")."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if self.eos_id in ids:  # what follows is padding, whatever the pad token is
            ids = ids[: ids.index(self.eos_id)]
        return " ".join(self._tk.decode(ids, skip_special_tokens=True).split())

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)
