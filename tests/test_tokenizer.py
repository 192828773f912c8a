"""The CLIP tokenizer against transformers' CLIPTokenizer, and the one minisd trains."""

import json
import warnings
from collections import Counter

import numpy as np
import pytest

from minisd.data import shapes
from minisd.tokenizer import BOS, EOS, Tokenizer, bytes_to_symbols

PROMPTS = [
    "a small red circle in the top left",
    "A Large BLUE Triangle, in the CENTER!!!",
    "",
    "   leading\tand trailing\n whitespace   ",
    "don't stop: it's 2024, we're at 3.14159 -- #1 (really?) [yes] {no} <ok> @you $5 50% a&b",
    "Café crème brûlée, naïve façade; Straße; Ελληνικά; 日本語のテキスト; हिन्दी; العربية; emoji 🍎🍏 😀",
    "e\u0301 vs \u00e9",  # decomposed and composed é: NFC makes them one
    "the quick brown fox jumps over the lazy dog " * 12,  # far past 77 tokens
    "<|endoftext|> inside a prompt",
]


def learn_merges(text, n):
    """A plain BPE learner (counts adjacent pairs, merges the most frequent), independent of minisd."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    words = Counter(text.lower().split())
    seqs = {}
    for w, c in words.items():
        sym = [b2u[b] for b in w.encode("utf-8")]
        sym[-1] += "</w>"
        seqs[tuple(sym)] = seqs.get(tuple(sym), 0) + c
    merges = []
    for _ in range(n):
        pairs = Counter()
        for seq, c in seqs.items():
            for p in zip(seq, seq[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new = {}
        for seq, c in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + c
        seqs = new
    symbols = list(b2u.values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A small CLIP-format folder (vocab.json + merges.txt), as SD v1.x ships, written here."""
    # Every test of this folder compares with transformers' CLIPTokenizer, and the learner
    # above takes GPT-2's byte symbols from transformers: without it they skip, with the reason.
    pytest.importorskip("transformers", reason="the CLIP-folder tests compare with transformers' CLIPTokenizer")
    captions = shapes.every_image("train").captions[::9]
    text = " ".join(PROMPTS[:2] + PROMPTS[4:6] + PROMPTS[7:] + captions)
    vocab, merges = learn_merges(text, 150)
    folder = tmp_path_factory.mktemp("sd") / "tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return folder


def reference_ids(folder, prompts, max_length=77):
    transformers = pytest.importorskip("transformers")
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder))
    return np.array(ref(prompts, padding="max_length", max_length=max_length, truncation=True)["input_ids"])


def test_byte_symbols_are_gpt2s():
    convert = pytest.importorskip("transformers.convert_slow_tokenizer")
    assert bytes_to_symbols() == convert.bytes_to_unicode()


def test_vocab_and_merges_match_transformers(clip_folder, tmp_path):
    want = reference_ids(clip_folder, PROMPTS)
    ours = Tokenizer.from_folder(str(clip_folder.parent))  # a model folder: finds tokenizer/
    with pytest.warns(UserWarning, match="truncated"):
        got = ours(PROMPTS)
    assert got.dtype == np.int64 and got.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(got, want)
    # the folder as transformers 5 saves it: tokenizer.json only
    transformers = pytest.importorskip("transformers")
    transformers.CLIPTokenizer.from_pretrained(str(clip_folder)).save_pretrained(str(tmp_path / "hf"))
    assert not (tmp_path / "hf" / "vocab.json").exists()
    with pytest.warns(UserWarning):
        np.testing.assert_array_equal(Tokenizer.from_folder(str(tmp_path / "hf"))(PROMPTS), want)
    # the same tokenizer written by minisd as tokenizer.json and read back
    ours.save(str(tmp_path / "tokenizer"))
    (tmp_path / "tokenizer" / "vocab.json").unlink()
    with pytest.warns(UserWarning):
        np.testing.assert_array_equal(Tokenizer.from_folder(str(tmp_path))(PROMPTS), want)


def test_other_lengths_and_pad_token(clip_folder, tmp_path):
    ours = Tokenizer.from_folder(str(clip_folder), max_length=16)
    with pytest.warns(UserWarning):
        np.testing.assert_array_equal(ours(PROMPTS), reference_ids(clip_folder, PROMPTS, 16))
    # SD 2.x pads with "!" instead of <|endoftext|>, said in its special_tokens_map.json
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((clip_folder / name).read_bytes())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!"}}))
    sd2 = Tokenizer.from_folder(str(tmp_path))
    assert sd2.pad_id == sd2.vocab["!"]
    ids = sd2("a red circle")[0]
    assert list(ids[5:]) == [sd2.pad_id] * 72 and ids[4] == sd2.eos_id
    assert sd2.decode(ids) == "a red circle"


def test_trained_tokenizer_round_trips(tmp_path):
    captions = shapes.every_image("all").captions
    tok = Tokenizer.train(captions, vocab_size=600)
    assert 514 < tok.vocab_size <= 600
    ids = tok(captions)
    # every caption word became one token: bos, 8 or 9 words, eos
    n_tokens = (ids != tok.pad_id).sum(axis=1) + 1
    assert np.array_equal(n_tokens, [len(c.split()) + 2 for c in captions])
    assert all(tok.decode(row) == c for row, c in zip(ids[::37], captions[::37]))
    assert tok.tokenize("a small red circle") == ["a</w>", "small</w>", "red</w>", "circle</w>"]

    tok.save(str(tmp_path))
    # the saved tokenizer.json alone, read by the tokenizers library, pads and truncates the same way
    tokenizers = pytest.importorskip("tokenizers")
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    sample = captions[::50] + PROMPTS[:7]
    with pytest.warns(UserWarning, match="truncated"):  # PROMPTS[5] is too long
        ids = tok(sample)
    np.testing.assert_array_equal([e.ids for e in raw.encode_batch(sample)], ids)
    # ... and transformers reads the folder as a CLIPTokenizer with the same ids
    np.testing.assert_array_equal(reference_ids(tmp_path, sample), ids)
    again = Tokenizer.from_folder(str(tmp_path))
    assert again.vocab == tok.vocab and again.merges == tok.merges


def test_truncation_keeps_the_end_token():
    tok = Tokenizer.train(["red green blue"] * 3, vocab_size=520)
    with pytest.warns(UserWarning, match="truncated"):
        ids = tok(["red " * 200])[0]
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) == 77
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly 75 tokens fit: no warning
        assert tok(["red " * 75])[0, -1] == tok.eos_id


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["a b"], vocab_size=100)
    with pytest.raises(ValueError, match="captions"):
        Tokenizer.train([])
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.from_folder(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.from_folder(str(tmp_path / "nowhere"))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        Tokenizer.from_folder(str(tmp_path))
    tok = Tokenizer.train(["red green blue"], vocab_size=520)
    with pytest.raises(ValueError, match="prompts"):
        tok([1, 2])
    with pytest.raises(ValueError, match="max_length"):
        Tokenizer(tok.vocab, tok.merges, max_length=1)
