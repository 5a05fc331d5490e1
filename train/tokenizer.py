"""CLIP's byte-level BPE tokenizer for SDXL's two text encoders, offline (docs/models.md, "Tokenizers").

The vocabulary is OpenAI's CLIP merge list (`data/bpe_simple_vocab_16e6.txt.gz`, MIT, shipped with this
package), or a diffusers folder's own `tokenizer/vocab.json` + `merges.txt`. The BPE itself runs in the
`tokenizers` library, set up the way CLIP tokenizes text, so the ids equal transformers' `CLIPTokenizer`:

- normalise: Unicode NFC, every whitespace run to one space, lower case;
- split into words, CLIP's pattern: contractions, letter runs, single digits, runs of other symbols;
- map each UTF-8 byte to a printable character (GPT-2's byte table) and merge pairs by BPE rank,
  the last piece of a word carrying the end-of-word mark `</w>`.

Both encoders share the vocabulary; they differ in padding: CLIP-L pads with the end token, OpenCLIP-G with
id 0 (`!`), as SDXL was trained. The vocabulary's last two ids are the start and end tokens.
"""
from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from lineage.errors import LineageError

VOCAB_FILE = Path(__file__).with_name("data") / "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408  # 512 byte symbols + 48,894 merges + start + end
START, END = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77  # start token + 75 prompt tokens + end token
# CLIP's word pattern: the special tokens, English contractions, letter runs, one digit, other symbols.
WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
OPENCLIP_G_PAD_ID = 0


def byte_symbols() -> list[str]:
    """GPT-2's table: byte b -> one printable character, so that BPE never sees whitespace or control bytes.
    Printable Latin-1 bytes stand for themselves; the others take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = dict(zip(printable, map(chr, printable))) | {b: chr(256 + n) for n, b in enumerate(others)}
    return [table[b] for b in printable + others]  # CLIP's vocabulary order: printable bytes first


@dataclass(frozen=True)
class ClipBPE:
    """One CLIP BPE vocabulary: text -> token ids, without start/end tokens or padding."""

    tokenizer: Tokenizer
    start_id: int
    end_id: int

    @classmethod
    def from_vocab(cls, vocab: dict[str, int], merges: list[tuple[str, str]]) -> ClipBPE:
        for special in (START, END):
            if special not in vocab:
                raise LineageError(f"the CLIP vocabulary has no {special} token")
        tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                                  unk_token=END, fuse_unk=False))
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tokenizer.add_special_tokens([START, END])  # typed literally in a prompt, they stay single tokens
        return cls(tokenizer, vocab[START], vocab[END])

    @classmethod
    def from_openai_merges(cls, path: Path, vocab_size: int = CLIP_VOCAB_SIZE) -> ClipBPE:
        """CLIP's vocabulary from OpenAI's merge list: the 256 byte symbols, the same with `</w>`, one token per
        merge, then start and end. A smaller `vocab_size` keeps the first merges (CLIP itself keeps the first
        48,894 of the list): the generated test checkpoints' embedding tables take real prompts that way."""
        merge_count = vocab_size - 2 * 256 - 2
        if merge_count < 0:
            raise LineageError(f"a CLIP vocabulary needs at least {2 * 256 + 2} entries, not {vocab_size}")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:merge_count + 1]  # the first line is a version header
        merges = [tuple(line.split()) for line in lines]
        symbols = byte_symbols()
        tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START, END]
        return cls.from_vocab({token: i for i, token in enumerate(tokens)}, merges)

    @classmethod
    def from_files(cls, vocab_json: Path, merges_txt: Path) -> ClipBPE:
        """A Hugging Face tokenizer folder's `vocab.json` (token -> id) and `merges.txt` (one pair a line)."""
        vocab = json.loads(vocab_json.read_text(encoding="utf-8"))
        lines = merges_txt.read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return cls.from_vocab(vocab, merges)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids


@dataclass(frozen=True)
class SDXLTokenizer:
    """The tokenizer of both SDXL text encoders: one vocabulary, a pad id per encoder."""

    bpe: ClipBPE
    clip_l_pad_id: int
    clip_g_pad_id: int = OPENCLIP_G_PAD_ID

    @classmethod
    def default(cls, vocab_size: int = CLIP_VOCAB_SIZE) -> SDXLTokenizer:
        """CLIP's vocabulary shipped with lineage (cut to `vocab_size` entries for smaller test models)."""
        return _default(vocab_size)

    @classmethod
    def from_diffusers(cls, folder: str | Path) -> SDXLTokenizer:
        """A diffusers SDXL folder's own tokenizer (`tokenizer/`; OpenCLIP-G's pad token from `tokenizer_2/`)."""
        folder = Path(folder)
        files = [folder / "tokenizer" / "vocab.json", folder / "tokenizer" / "merges.txt"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise LineageError(f"{folder}: not a diffusers SDXL folder with a tokenizer ({', '.join(missing)} missing)")
        bpe = ClipBPE.from_files(*files)
        pad_token = _pad_token(folder / "tokenizer_2") or "!"
        pad_id = bpe.tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise LineageError(f"{folder / 'tokenizer_2'}: pad token {pad_token!r} is not in the vocabulary")
        return cls(bpe, clip_l_pad_id=bpe.end_id, clip_g_pad_id=pad_id)

    @property
    def start_id(self) -> int:
        return self.bpe.start_id

    @property
    def end_id(self) -> int:
        return self.bpe.end_id

    @property
    def comma_id(self) -> int:
        """The id of a lone comma (`,</w>`, a byte symbol: in every vocabulary), where A1111 prefers to cut chunks."""
        return self.bpe.tokenizer.token_to_id(",</w>")

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, without start/end tokens (emphasis syntax is read by lineage.train.prompts)."""
        return self.bpe.encode(text)


@functools.lru_cache(maxsize=4)
def _default(vocab_size: int) -> SDXLTokenizer:
    if not VOCAB_FILE.is_file():
        raise LineageError(f"CLIP vocabulary {VOCAB_FILE} is missing: reinstall lmerge, or pass "
                           "SDXLTokenizer.from_diffusers(FOLDER) for a diffusers model's own tokenizer")
    bpe = ClipBPE.from_openai_merges(VOCAB_FILE, vocab_size)
    return SDXLTokenizer(bpe, clip_l_pad_id=bpe.end_id)


def _pad_token(tokenizer_folder: Path) -> str | None:
    """The pad token named in a Hugging Face tokenizer folder's config files, if any."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = tokenizer_folder / name
        if path.is_file():
            pad = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
            if isinstance(pad, dict):  # {"content": "!", ...} in older files
                pad = pad.get("content")
            if isinstance(pad, str):
                return pad
    return None
