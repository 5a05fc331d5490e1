"""The CLIP BPE tokenizer (lineage.train.tokenizer), A1111's emphasis syntax (lineage.train.prompts) and the
77-token chunks (lineage.train.conditioning.tokenize_prompts): ids equal to transformers' CLIPTokenizer."""
from __future__ import annotations

import pytest
from tokenizer_files import transformers_tokenizer, write_hf_tokenizer

from lineage.errors import LineageError
from lineage.train import tokenizer as tokenizer_module
from lineage.train.conditioning import CHUNK_TOKENS, prompt_chunks, tokenize_prompts
from lineage.train.prompts import Piece, parse_emphasis
from lineage.train.tokenizer import CLIP_VOCAB_SIZE, SDXLTokenizer

pytest.importorskip("transformers")

PROMPTS = [
    "a photo of a cat",
    "",
    "Ünïcödé café naïve 日本語のテキスト Ελληνικά русский",
    "hello,world!!! ... ?! -- ~~~ @#$%^&* 'quoted' \"double\"",
    "(masterpiece:1.2), ((best quality)), [blurry], \\(escaped\\) score_9, score_8_up",
    "1234567 3.14159 1girl 2boys 1024x1024 -5 +7",
    "🙂🐱👍🏽 emoji ❤️ ★ → ™",
    "it's don't we'll I'M THEY'RE you've",
    "&amp; &lt;b&gt; <|endoftext|> <|startoftext|>",
    "  tabs\tand\nnewlines\r\n  and   runs of   spaces  ",
    "İstanbul ǅungla Straße ẞ ﬁne ＦＵＬＬＷＩＤＴＨ",
    "a very long prompt, " * 30,
]


@pytest.fixture(scope="module")
def tokenizer() -> SDXLTokenizer:
    return SDXLTokenizer.default()


@pytest.fixture(scope="module")
def hf_folder(tokenizer, tmp_path_factory):
    return write_hf_tokenizer(tokenizer, tmp_path_factory.mktemp("clip") / "tokenizer")


@pytest.fixture(scope="module")
def reference(hf_folder):
    return transformers_tokenizer(hf_folder)


def test_vocabulary_is_clips(tokenizer):
    """The ids CLIP gives a known sentence (vocab ids of 'a</w>', 'photo</w>', 'of</w>', 'cat</w>')."""
    assert tokenizer.bpe.vocab_size == CLIP_VOCAB_SIZE
    assert (tokenizer.start_id, tokenizer.end_id) == (49406, 49407)
    assert tokenizer.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tokenizer.encode("A  Photo\tOF a CAT") == [320, 1125, 539, 320, 2368]  # lower case, whitespace runs


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_equal_transformers(tokenizer, reference, prompt):
    assert tokenizer.encode(prompt) == reference(prompt, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("prompt", [p for p in PROMPTS if not set("()[]\\") & set(p)])
def test_padded_rows_equal_transformers(tokenizer, reference, prompt):
    """Prompts without emphasis syntax: CLIP-L's first 77-token row equals transformers' (end-token padding);
    OpenCLIP-G's is the same row padded with id 0 after the end token. (diffusers' tokenizer_2 also pads with
    id 0, but makes its pad token '!' special, so that a '!' typed in a prompt becomes id 0 too; SDXL's own
    OpenCLIP tokenizer and A1111 tokenize a typed '!' as text, as we do.)"""
    tokens = tokenize_prompts(tokenizer, [prompt])
    want = reference(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert tokens.clip_l_ids[0, 0].tolist() == want
    end = min(len(tokenizer.encode(prompt)), CHUNK_TOKENS) + 1  # the closing end token
    assert tokens.clip_g_ids[0, 0].tolist() == want[:end + 1] + [0] * (76 - end)


def test_small_vocabulary_keeps_the_first_merges(tmp_path):
    """A vocabulary cut to a test model's embedding table: still a CLIP BPE (transformers agrees on the ids),
    every id below the cut, start and end the last two."""
    small = SDXLTokenizer.default(vocab_size=1544)
    reference = transformers_tokenizer(write_hf_tokenizer(small, tmp_path / "tokenizer"))
    assert (small.start_id, small.end_id) == (1542, 1543)
    for prompt in PROMPTS:
        ids = small.encode(prompt)
        assert ids == reference(prompt, add_special_tokens=False)["input_ids"]
        assert all(0 <= i < 1544 for i in ids)
    with pytest.raises(LineageError, match="at least 514"):
        SDXLTokenizer.default(vocab_size=100)


def test_missing_vocabulary_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(tokenizer_module, "VOCAB_FILE", tmp_path / "gone.txt.gz")
    tokenizer_module._default.cache_clear()
    with pytest.raises(LineageError) as error:
        SDXLTokenizer.default()
    message = str(error.value)
    assert "gone.txt.gz is missing" in message and "from_diffusers" in message and "\n" not in message
    monkeypatch.undo()
    tokenizer_module._default.cache_clear()


def test_diffusers_folder_tokenizer(tokenizer, tmp_path):
    """A diffusers folder's own files: the same ids; OpenCLIP-G's pad token read from tokenizer_2."""
    write_hf_tokenizer(tokenizer, tmp_path / "tokenizer")
    write_hf_tokenizer(tokenizer, tmp_path / "tokenizer_2", pad_token="!")
    own = SDXLTokenizer.from_diffusers(tmp_path)
    assert (own.clip_l_pad_id, own.clip_g_pad_id) == (tokenizer.end_id, 0)
    for prompt in PROMPTS:
        assert own.encode(prompt) == tokenizer.encode(prompt)
    with pytest.raises(LineageError, match=r"not a diffusers SDXL folder.*vocab\.json"):
        SDXLTokenizer.from_diffusers(tmp_path / "elsewhere")


@pytest.mark.parametrize(("prompt", "pieces"), [
    ("a cat", [("a cat", 1.0)]),
    ("", [("", 1.0)]),
    ("a (cat) dog", [("a ", 1.0), ("cat", 1.1), (" dog", 1.0)]),
    ("((cat))", [("cat", 1.1 * 1.1)]),
    ("[cat]", [("cat", 1 / 1.1)]),
    ("[[cat]]", [("cat", 1 / 1.1 / 1.1)]),
    ("(cat:1.5) dog", [("cat", 1.5), (" dog", 1.0)]),
    ("(a (cat:0.5) b:2)", [("a ", 2.0), ("cat", 1.0), (" b", 2.0)]),
    ("( cat : 1.25 )", [(" cat ", 1.25)]),
    ("\\(cat\\) \\[x\\] a\\\\b", [("(cat) [x] a\\b", 1.0)]),
    ("(unclosed cat", [("unclosed cat", 1.1)]),
    ("[unclosed", [("unclosed", 1 / 1.1)]),
    ("cat) dog]", [("cat) dog]", 1.0)]),
    ("time 10:30, ratio 16:9", [("time 10:30, ratio 16:9", 1.0)]),
    ("cat:1.2)", [("cat:1.2)", 1.0)]),
    ("(cat:-0.5)", [("cat", -0.5)]),
])
def test_emphasis(prompt, pieces):
    got = parse_emphasis(prompt)
    assert [p.text for p in got] == [text for text, _ in pieces]
    assert [p.weight for p in got] == pytest.approx([w for _, w in pieces])


def test_break_starts_a_new_chunk(tokenizer):
    assert parse_emphasis("a cat BREAK a dog") == [Piece("a cat", 1.0), Piece("", 1.0, True), Piece("a dog", 1.0)]
    chunks = prompt_chunks(tokenizer, "a cat BREAK (a dog)")
    assert [[t for t, _ in c] for c in chunks] == [tokenizer.encode("a cat"), tokenizer.encode("a dog")]
    assert [w for _, w in chunks[1]] == pytest.approx([1.1, 1.1])
    assert "BREAKFAST" in parse_emphasis("BREAKFAST")[0].text  # only the whole word


def test_long_prompts_in_75_token_chunks(tokenizer):
    words = " ".join(f"word{i}" for i in range(70))  # 'word' and each digit: ~2-3 tokens per word
    ids = tokenizer.encode(words)
    assert 2 * CHUNK_TOKENS < len(ids) <= 3 * CHUNK_TOKENS
    tokens = tokenize_prompts(tokenizer, [words, "a cat"])
    assert tokens.clip_l_ids.shape == (2, 3, 77)
    for chunk in range(3):
        row = tokens.clip_l_ids[0, chunk].tolist()
        expected = ids[chunk * CHUNK_TOKENS:(chunk + 1) * CHUNK_TOKENS]
        assert row[0] == tokenizer.start_id and row[1:1 + len(expected)] == expected
        assert row[1 + len(expected)] == tokenizer.end_id
    empty = tokenize_prompts(tokenizer, [""])
    for chunk in (1, 2):  # the shorter prompt is padded with empty chunks
        assert tokens.clip_l_ids[1, chunk].tolist() == empty.clip_l_ids[0, 0].tolist()
        assert tokens.clip_g_ids[1, chunk].tolist() == empty.clip_g_ids[0, 0].tolist()


@pytest.mark.parametrize(("before", "after", "first_chunk"), [
    (60, 20, 61),  # the comma 15 tokens from the chunk's end: cut after it, the 14 digits after it move on
    (55, 30, 56),  # 20 from the end: still cut there (A1111's default reach)
    (54, 30, 75),  # 21 from the end: too far back, cut at 75 tokens
])
def test_full_chunk_is_cut_after_its_last_comma(tokenizer, before, after, first_chunk):
    digits = "0123456789" * 10  # one token per digit
    prompt = digits[:before] + "," + digits[:after]
    chunks = prompt_chunks(tokenizer, prompt)
    assert [len(c) for c in chunks] == [first_chunk, before + 1 + after - first_chunk]
    assert [t for c in chunks for t, _ in c] == tokenizer.encode(prompt)
    if first_chunk < CHUNK_TOKENS:
        assert chunks[0][-1][0] == tokenizer.comma_id


def test_empty_prompt_is_start_end_and_padding(tokenizer):
    tokens = tokenize_prompts(tokenizer, [""])
    assert tokens.clip_l_ids[0, 0].tolist() == [tokenizer.start_id] + [tokenizer.end_id] * 76
    assert tokens.clip_g_ids[0, 0].tolist() == [tokenizer.start_id, tokenizer.end_id] + [0] * 75
    assert tokens.weights.eq(1).all()


def test_emphasis_weights_reach_the_tokens(tokenizer):
    tokens = tokenize_prompts(tokenizer, ["a (cat:1.5) [dog]"])
    n_a, n_cat = len(tokenizer.encode("a ")), len(tokenizer.encode("cat"))
    weights = tokens.weights[0, 0].tolist()
    assert weights[0] == 1.0 and weights[1:1 + n_a] == [1.0] * n_a
    assert weights[1 + n_a:1 + n_a + n_cat] == pytest.approx([1.5] * n_cat)
    assert weights[1 + n_a + n_cat] == pytest.approx(1 / 1.1)
    assert weights[2 + n_a + n_cat:] == [1.0] * (77 - 2 - n_a - n_cat)


def test_prompt_over_1000_tokens_is_one_line(tokenizer):
    with pytest.raises(LineageError) as error:
        tokenize_prompts(tokenizer, ["cat " * 1001])
    assert "1001 tokens; at most 1000" in str(error.value) and "\n" not in str(error.value)
    assert tokenize_prompts(tokenizer, ["cat " * 1000]).clip_l_ids.shape[1] == 14  # 1000 tokens: 14 chunks


def test_bad_prompt_lists(tokenizer):
    with pytest.raises(LineageError, match="not one string"):
        tokenize_prompts(tokenizer, "a cat")
    with pytest.raises(LineageError, match="no prompt"):
        tokenize_prompts(tokenizer, [])
