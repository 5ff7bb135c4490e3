"""CLIPTokenizer: ids equal to transformers' CLIPTokenizer and to a plain-Python BPE written from the
CLIP paper's description; folder round trips; clear errors for bad vocabulary files."""

import gzip
import json
import unicodedata

import pytest
import regex
import torch

from noisecraft.errors import NoisecraftError
from noisecraft.models.tokenizer import CLIPTokenizer, default_bpe_path

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "   ",
    "Hello, World!",
    "HELLO WoRLd",
    "multiple     spaces\tand\ttabs\nand a newline",
    "digits 1234567890 and pi is 3.14159",
    "price: $19.99 (20% off!!!)",
    "café crème brûlée",
    "naïve résumé, Ünïcödé ÀÉÎÕÜ",
    "combining e\u0301 accent",
    "東京タワー at night",
    "Привет мир",
    "emoji 😀🎉🚀 party",
    "👍🏽 thumbs up",
    "it's a dog's life, isn't it? we'll see; they're here, I'd go, you've been, I'm in",
    "hyphen-ated words and under_scores",
    "mail me@example.com or visit https://example.com/path?q=1&r=2",
    "\"double quotes\" and 'single quotes'",
    "trailing punctuation...!!!???",
    "CamelCaseWordsTogether mixed123abc456",
    "x" * 200,
    "ﬁ ligature and ² superscript",
    "a\u00a0non-breaking space and zero\u200bwidth",
    "an oil painting of a cat, trending on artstation, 4k, highly detailed",
    "!!!",
    "a red cube on top of a blue sphere",
    "<|endoftext|> a literal end token",
    " ".join(["a very long prompt that keeps going"] * 20),
    "((masterpiece)), [best quality]:1.2, {foo|bar}",
]


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, written independently of the module under test."""
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    rest = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(rest))], keep + rest


def _merges() -> list[tuple[str, str]]:
    lines = gzip.decompress(default_bpe_path().read_bytes()).decode("utf-8").split("\n")
    return [tuple(line.split(" ")) for line in lines[1:49152 - 256 - 2 + 1]]


class ReferenceBPE:
    """CLIP's tokenizer as the original algorithm states it: clean, lower-case, split with CLIP's regex,
    map bytes to characters, then repeatedly merge the adjacent pair of lowest rank."""

    def __init__(self, merges):
        chars, order = _byte_chars()
        self.byte_char = dict(zip(order, chars))
        tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.rank = {m: i for i, m in enumerate(merges)}
        self.pattern = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")

    def bpe(self, piece: str) -> list[str]:
        word = list(piece[:-1]) + [piece[-1] + "</w>"]
        while len(word) > 1:
            pairs = [(self.rank.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            best, _ = min(pairs)
            if best == float("inf"):
                break
            first, second = next((word[i], word[i + 1]) for r, i in pairs if r == best)
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def __call__(self, text: str, length: int = 77) -> list[int]:
        text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()
        ids = []
        for piece in self.pattern.findall(text):
            if piece in ("<|startoftext|>", "<|endoftext|>"):
                ids.append(self.ids[piece])
                continue
            chars = "".join(self.byte_char[b] for b in piece.encode("utf-8"))
            ids += [self.ids[t] for t in self.bpe(chars)]
        ids = [self.ids["<|startoftext|>"]] + ids[:length - 2] + [self.ids["<|endoftext|>"]]
        return ids + [self.ids["<|endoftext|>"]] * (length - len(ids))


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.from_bpe_file()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """vocab.json + merges.txt written from the BPE file by the test itself (not by CLIPTokenizer.save)."""
    merges = _merges()
    chars, _ = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("hf_clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return folder


def test_clip_constants(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.max_length) == (49408, 49406, 49407, 49407, 77)
    ids = tok("a photo of an astronaut riding a horse on mars")
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    # The ids Stable Diffusion's documentation shows for this prompt.
    assert ids[0, :12].tolist() == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]
    assert (ids[0, 12:] == 49407).all()


def test_test_vector_and_attention_mask(tok):
    """transformers' CLIPTokenizer on openai/clip-vit-large-patch14 gives these ids for this prompt."""
    batch = tok.batch_encode("a dog wearing hat")
    assert batch["input_ids"][0, :6].tolist() == [49406, 320, 1929, 3309, 3801, 49407]
    assert batch["input_ids"][0, 6:].tolist() == [49407] * 71
    assert batch["attention_mask"][0].tolist() == [1] * 6 + [0] * 71
    assert torch.equal(tok("a dog wearing hat"), batch["input_ids"])
    long = tok.batch_encode(["horse " * 100, ""], max_length=10)["attention_mask"]
    assert long.tolist() == [[1] * 10, [1, 1] + [0] * 8]


def test_ids_match_transformers(tok, hf_folder):
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTokenizer.from_pretrained(str(hf_folder))
    theirs = hf(PROMPTS, padding="max_length", max_length=77, truncation=True)
    ours = tok.batch_encode(PROMPTS)
    for prompt, a, b, mask_a, mask_b in zip(PROMPTS, ours["input_ids"].tolist(), theirs["input_ids"],
                                            ours["attention_mask"].tolist(), theirs["attention_mask"]):
        assert a == b and mask_a == mask_b, prompt


def test_ids_match_reference_bpe(tok):
    reference = ReferenceBPE(_merges())
    ours = tok(PROMPTS).tolist()
    for prompt, a in zip(PROMPTS, ours):
        assert a == reference(prompt), prompt


def test_padding_and_truncation(tok):
    long = tok(" ".join(["horse"] * 200))
    assert long.shape == (1, 77) and long[0, 0] == tok.bos_id and long[0, -1] == tok.eos_id
    assert (long[0, 1:-1] != tok.eos_id).all()  # 75 real tokens, no padding
    short = tok(["a cat", "a photo of a dog"], max_length=10)
    assert short.shape == (2, 10)
    assert short[0].tolist()[:4] == [tok.bos_id, *tok(["a cat"])[0, 1:3].tolist(), tok.eos_id]
    empty = tok("")
    assert empty[0, :2].tolist() == [tok.bos_id, tok.eos_id] and (empty[0, 2:] == tok.pad_id).all()


def test_tokenize_and_decode(tok):
    assert tok.tokenize("A photo of a cat") == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    assert tok.decode(tok("A photo of a CAT!")[0]) == "a photo of a cat !"
    assert tok.decode(tok("café 😀")[0].tolist()) == "café 😀"


def test_folder_round_trip(tok, tmp_path):
    tok.save(tmp_path / "tokenizer")
    again = CLIPTokenizer.from_folder(tmp_path / "tokenizer")
    assert again.max_length == 77 and again.pad_id == 49407
    assert torch.equal(again(PROMPTS), tok(PROMPTS))
    # SD 2.x style: pads with "!" and a different length, read back from tokenizer_config.json.
    sd2 = CLIPTokenizer.from_files(tmp_path / "tokenizer" / "vocab.json", tmp_path / "tokenizer" / "merges.txt",
                                   max_length=20, pad_token="!")
    sd2.save(tmp_path / "sd2")
    back = CLIPTokenizer.from_folder(tmp_path / "sd2")
    assert (back.max_length, back.pad_id) == (20, 0)
    assert back("a cat")[0, 4:].tolist() == [0] * 16
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "sd2"))
    assert hf.model_max_length == 20 and hf.pad_token_id == 0
    assert hf(PROMPTS[:6], padding="max_length", max_length=20, truncation=True)["input_ids"] == back(PROMPTS[:6]).tolist()


def test_errors(tmp_path):
    with pytest.raises(NoisecraftError, match="does not exist"):
        CLIPTokenizer.from_bpe_file(tmp_path / "nope.txt.gz")
    broken = tmp_path / "broken.txt.gz"
    broken.write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    with pytest.raises(NoisecraftError, match="damaged"):
        CLIPTokenizer.from_bpe_file(broken)
    short = tmp_path / "short.txt"
    short.write_text("#version: 0.2\ni n\nt h\n")
    with pytest.raises(NoisecraftError, match="merges"):
        CLIPTokenizer.from_bpe_file(short)
    with pytest.raises(NoisecraftError, match="does not exist"):
        CLIPTokenizer.from_folder(tmp_path / "missing")
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(NoisecraftError, match="vocab.json does not exist"):
        CLIPTokenizer.from_folder(folder)
    (folder / "vocab.json").write_text('{"a": 0, "b": 1,')
    with pytest.raises(NoisecraftError, match="not valid JSON"):
        CLIPTokenizer.from_folder(folder)
    (folder / "vocab.json").write_text('{"a": 0, "b": 1}')
    with pytest.raises(NoisecraftError, match="no start token"):
        CLIPTokenizer.from_folder(folder)
    (folder / "vocab.json").write_text('{"a": 0, "b": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}')
    (folder / "merges.txt").write_text("#version: 0.2\na c\n")
    with pytest.raises(NoisecraftError, match="inconsistent"):
        CLIPTokenizer.from_folder(folder)
    (folder / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(NoisecraftError, match="line 2"):
        CLIPTokenizer.from_folder(folder)
    with pytest.raises(NoisecraftError, match="max_length"):
        CLIPTokenizer.from_bpe_file(max_length=1)
