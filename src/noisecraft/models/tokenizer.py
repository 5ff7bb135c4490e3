"""CLIP's tokenizer: byte-level byte-pair encoding (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision", §2.5; the BPE of Sennrich et al. 2016 over bytes, as GPT-2).

The pipeline, each stage a component of the `tokenizers` library:

    text ─ NFC, whitespace runs -> one space, lower-case ─ CLIP's split regex ─ bytes -> printable chars
         ─ BPE with end-of-word suffix "</w>" ─ ids ─ <|startoftext|> ids <|endoftext|> padding

Stable Diffusion 1.x reads prompts as exactly 77 ids padded with <|endoftext|> (49407); the text
encoder's causal mask makes the padding harmless. `__call__` returns that B×77 LongTensor; `batch_encode` adds the
attention mask (1 at real tokens, 0 at padding), as transformers' tokenizer returns it.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import torch

from ..errors import NoisecraftError
from ..io.checkpoint import atomic_write_bytes, save_json

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# Merges used by CLIP: the file holds more, but the model's vocabulary of 49408 stops after this many.
CLIP_NUM_MERGES = 49152 - 256 - 2
DEFAULT_MAX_LENGTH = 77
# CLIP's pre-tokenisation: the special tokens, English contractions, letter runs, single digits,
# and runs of anything else that is not whitespace (whitespace itself is dropped).
CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable characters, in vocabulary order.

    Printable Latin-1 bytes map to themselves; the others (control codes, space, ...) to 256 + n in
    byte order, so BPE never sees whitespace or control characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    # Vocabulary order is the printable bytes first, then the remapped ones (the order CLIP used).
    return {b: table[b] for b in [*printable, *(b for b in range(256) if b not in printable)]}


def clip_vocab_from_merges(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary: the 256 byte characters, the same with "</w>", each merge joined, then the two specials."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}


def default_bpe_path() -> Path:
    """The copy of CLIP's bpe_simple_vocab_16e6.txt.gz shipped in noisecraft/assets."""
    return Path(__file__).resolve().parent.parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"


def _parse_merges(lines: list[str], source: Path) -> list[tuple[str, str]]:
    merges = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (number == 1 and line.startswith("#")):
            continue  # header ("#version: 0.2") and blank lines
        pair = line.rstrip("\r\n").split(" ")
        if len(pair) != 2 or not all(pair):
            raise NoisecraftError(
                f"merges file {source} line {number} is not two tokens separated by a space ({line[:40]!r}); "
                "restore the file from the original tokenizer.")
        merges.append((pair[0], pair[1]))
    return merges


class CLIPTokenizer:
    """Prompts -> B×L token ids exactly as CLIP and Stable Diffusion expect them.

    Build it from CLIP's BPE file (`from_bpe_file()`, offline from the bundled copy), from a Hugging
    Face `vocab.json` + `merges.txt` pair (`from_files`), or from a Stable Diffusion `tokenizer/`
    folder (`from_folder`).
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int = DEFAULT_MAX_LENGTH,
                 pad_token: str = EOS_TOKEN, source: str = "tokenizer"):
        from tokenizers import (
            AddedToken,
            Regex,
            Tokenizer,
            decoders,
            normalizers,
            pre_tokenizers,
        )
        from tokenizers.models import BPE

        if not isinstance(max_length, int) or max_length < 2:
            raise NoisecraftError(f"tokenizer max_length must be an integer >= 2 (room for the start and end "
                                  f"tokens), got {max_length!r}.")
        for name, token in (("start", BOS_TOKEN), ("end", EOS_TOKEN), ("padding", pad_token)):
            if token not in vocab:
                raise NoisecraftError(f"{source} has no {name} token {token!r} in its vocabulary; "
                                      "use a CLIP vocabulary (vocab.json + merges.txt of a CLIP tokenizer).")
        try:
            model = BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False, unk_token=EOS_TOKEN, dropout=None)
        except Exception as e:  # tokenizers raises plain Exception for merges outside the vocabulary
            raise NoisecraftError(f"{source} is inconsistent ({e}); restore vocab.json and merges.txt "
                                  "from the same tokenizer.") from None
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        # Special tokens written in a prompt map to their ids, as in Hugging Face's CLIPTokenizer; that
        # includes a padding token such as SD 2.x's "!" (id 0, where OpenCLIP would give "!</w>").
        specials = dict.fromkeys([BOS_TOKEN, EOS_TOKEN, pad_token])
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        self._tokenizer = tok
        self._vocab = dict(vocab)
        self._merges = list(merges)
        self.max_length = max_length
        self.pad_token = pad_token
        self.bos_id = vocab[BOS_TOKEN]
        self.eos_id = vocab[EOS_TOKEN]
        self.pad_id = vocab[pad_token]
        self.vocab_size = len(vocab)

    # ------------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def from_bpe_file(cls, path: str | Path | None = None, max_length: int = DEFAULT_MAX_LENGTH) -> CLIPTokenizer:
        """CLIP's own `bpe_simple_vocab_16e6.txt.gz` (None: the bundled copy): 48894 merges, 49408 tokens."""
        path = Path(path).expanduser() if path is not None else default_bpe_path()
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise NoisecraftError(f"CLIP vocabulary file {path} does not exist; pass the path of "
                                  "bpe_simple_vocab_16e6.txt.gz, or None for the bundled copy.") from None
        except OSError as e:
            raise NoisecraftError(f"cannot read CLIP vocabulary file {path} ({e.strerror or e}); "
                                  "check its permissions.") from None
        try:
            text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
        except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
            raise NoisecraftError(f"CLIP vocabulary file {path} is damaged ({type(e).__name__}: {e}); "
                                  "replace it with a fresh copy of bpe_simple_vocab_16e6.txt.gz.") from None
        # Line 0 is a header; the vocabulary uses the next CLIP_NUM_MERGES lines.
        lines = text.split("\n")[1:CLIP_NUM_MERGES + 1]
        merges = _parse_merges(lines, path)
        if len(merges) != CLIP_NUM_MERGES:
            raise NoisecraftError(f"CLIP vocabulary file {path} holds {len(merges)} merges, fewer than CLIP's "
                                  f"{CLIP_NUM_MERGES}; replace it with a fresh copy of bpe_simple_vocab_16e6.txt.gz.")
        return cls(clip_vocab_from_merges(merges), merges, max_length=max_length, source=f"CLIP vocabulary {path}")

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path, max_length: int = DEFAULT_MAX_LENGTH,
                   pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
        """A Hugging Face-style pair: vocab.json (token -> id) and merges.txt ("#version" header, one merge a line)."""
        vocab_json, merges_txt = Path(vocab_json).expanduser(), Path(merges_txt).expanduser()
        try:
            vocab = json.loads(vocab_json.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise NoisecraftError(f"tokenizer vocabulary {vocab_json} does not exist; check the path.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise NoisecraftError(f"tokenizer vocabulary {vocab_json} is not valid JSON ({e}); "
                                  "restore it from the original tokenizer.") from None
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise NoisecraftError(f"tokenizer vocabulary {vocab_json} is not a JSON object of token -> id; "
                                  "restore it from the original tokenizer.")
        try:
            lines = merges_txt.read_text(encoding="utf-8").split("\n")
        except FileNotFoundError:
            raise NoisecraftError(f"tokenizer merges file {merges_txt} does not exist; check the path.") from None
        except UnicodeDecodeError as e:
            raise NoisecraftError(f"tokenizer merges file {merges_txt} is not UTF-8 text ({e}); "
                                  "restore it from the original tokenizer.") from None
        return cls(vocab, _parse_merges(lines, merges_txt), max_length=max_length, pad_token=pad_token,
                   source=f"tokenizer {vocab_json.parent}")

    @classmethod
    def from_folder(cls, path: str | Path, max_length: int | None = None) -> CLIPTokenizer:
        """A Stable Diffusion / Hugging Face `tokenizer/` folder: vocab.json + merges.txt, and optionally
        tokenizer_config.json / special_tokens_map.json for model_max_length and pad_token
        (SD 1.x pads with <|endoftext|>, SD 2.x with "!")."""
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise NoisecraftError(f"tokenizer folder {folder} does not exist; pass a folder holding "
                                  "vocab.json and merges.txt.")
        settings: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins
            file = folder / name
            if file.exists():
                try:
                    data = json.loads(file.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise NoisecraftError(f"{file} is not valid JSON ({e}); restore or delete it.") from None
                if isinstance(data, dict):
                    settings.update(data)
        pad = settings.get("pad_token") or EOS_TOKEN
        if isinstance(pad, dict):  # serialised AddedToken: {"content": "...", ...}
            pad = pad.get("content", EOS_TOKEN)
        if max_length is None:
            stored = settings.get("model_max_length")
            # Some configs store a huge sentinel (1e30) meaning "no limit"; CLIP's positions stop at 77.
            max_length = int(stored) if isinstance(stored, (int, float)) and 2 <= stored <= 4096 else DEFAULT_MAX_LENGTH
        if not (folder / "vocab.json").exists() and (folder / "tokenizer.json").exists():
            return cls.from_tokenizer_json(folder / "tokenizer.json", max_length=max_length, pad_token=pad)
        return cls.from_files(folder / "vocab.json", folder / "merges.txt", max_length=max_length, pad_token=pad)

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, max_length: int = DEFAULT_MAX_LENGTH,
                            pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
        """The single tokenizer.json that transformers >= 5 saves instead of vocab.json + merges.txt (a BPE
        model whose "vocab" and "merges" are the same tables)."""
        path = Path(path)
        try:
            model = json.loads(path.read_text(encoding="utf-8")).get("model", {})
            vocab, merges = model["vocab"], model["merges"]
            merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError) as e:
            raise NoisecraftError(f"{path} is not a BPE tokenizer.json ({type(e).__name__}: {e}); restore it from the "
                                  "original tokenizer.") from None
        if not isinstance(vocab, dict) or any(len(m) != 2 for m in merges):
            raise NoisecraftError(f"{path} does not hold a BPE vocabulary and merges; restore it.")
        return cls(vocab, merges, max_length=max_length, pad_token=pad_token, source=f"tokenizer {path.parent}")

    def save(self, folder: str | Path) -> Path:
        """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json (Hugging Face's
        layout), which `from_folder` and transformers' CLIPTokenizer both read."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_json(self._vocab, folder / "vocab.json")
        merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._merges)
        atomic_write_bytes(folder / "merges.txt", merges.encode("utf-8"))
        special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": self.pad_token}
        save_json({**special, "model_max_length": self.max_length, "tokenizer_class": "CLIPTokenizer",
                   "do_lower_case": True, "add_prefix_space": False, "errors": "replace"},
                  folder / "tokenizer_config.json")
        save_json(special, folder / "special_tokens_map.json")
        return folder

    # ------------------------------------------------------------------------------------------
    # Use

    def __call__(self, prompts: str | list[str], max_length: int | None = None) -> torch.LongTensor:
        """B×L ids: <|startoftext|> tokens <|endoftext|> then padding; long prompts lose their tail
        tokens, never the end token (the text encoder pools at it)."""
        return self.batch_encode(prompts, max_length)["input_ids"]

    def batch_encode(self, prompts: str | list[str], max_length: int | None = None) -> dict[str, torch.LongTensor]:
        """{"input_ids": B×L ids as __call__ gives them, "attention_mask": B×L, 1 at the real tokens (start and end
        tokens included) and 0 at the padding}: what transformers' tokenizer(prompts, padding="max_length",
        truncation=True) returns. CLIP's causal text encoder needs no mask; other readers of the tokens may."""
        if isinstance(prompts, str):
            prompts = [prompts]
        length = self.max_length if max_length is None else max_length
        if not isinstance(length, int) or length < 2:
            raise NoisecraftError(f"max_length must be an integer >= 2, got {length!r}.")
        if not all(isinstance(p, str) for p in prompts):
            raise NoisecraftError("prompts must be strings; pass a string or a list of strings.")
        ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, encoding in enumerate(self._tokenizer.encode_batch(list(prompts), add_special_tokens=False)):
            tokens = [self.bos_id, *encoding.ids[:length - 2], self.eos_id]
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, :len(tokens)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def tokenize(self, prompt: str) -> list[str]:
        """The BPE pieces of a prompt, e.g. ["a</w>", "photo</w>", "of</w>", ...] (no special tokens)."""
        return self._tokenizer.encode(prompt, add_special_tokens=False).tokens

    def decode(self, ids) -> str:
        """Text back from ids (a list or a 1-D tensor), dropping start, end and padding tokens."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        ids = [int(i) for i in ids if int(i) not in (self.bos_id, self.eos_id, self.pad_id)]
        text = self._tokenizer.decode(ids, skip_special_tokens=True)
        return " ".join(text.replace("</w>", " ").split())

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"CLIPTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length}, pad_id={self.pad_id})"
