"""clip_text.Tokenizer against OpenCLIP's own tokenizer (the ids SD-2.1's text tower was trained on).

OpenCLIP's `tokenizer.py` is loaded on its own from the installed open_clip_torch package
(spec_from_file_location): importing the `open_clip` package needs torchvision, which is absent.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

from clip_text import tokenizer as tokenizer_module
from clip_text.tokenizer import Tokenizer

PROMPTS = [
    "a photo of a wolf walking in the snow",
    "a woman running, oil painting by Van Gogh",
    "café crème brûlée, naïve Øresund Ærø",  # accents
    "🐺 howling at the 🌕 moon 😀👍🏽",  # emoji, incl. a skin-tone modifier
    "日本語の文章 中文句子 한국어",  # CJK (byte-level tokens)
    "Tom &amp; Jerry said &quot;hi&quot; &lt;3",  # html entities
    "salt &amp;amp; pepper",  # double-escaped: OpenCLIP unescapes twice
    "  lots   of\t\twhitespace\n\nand\r\nnewlines  ",
    "UPPER Case MiXeD",
    "dog!!",
    "Hello, world! What?! ... (yes) [no] {maybe} @home #tag $5 100% a_b c-d e/f",
    "I'm sure it's what they've said we'll do, you'd know it won't",
    "3.14159 and 1000000 and 2nd",
    "",
    "x<start_of_text>y <end_of_text>",  # spelled-out special tokens get their ids
    "!<end_of_text>",  # ... except right after punctuation, which swallows the "<"
    "mojibake: cafÃ©",  # ftfy repairs it first
]


def load_open_clip_tokenizer_module():
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("open_clip_torch is not installed (pip install --no-deps open_clip_torch): it is the reference")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.py"
    ref_spec = importlib.util.spec_from_file_location("open_clip_reference_tokenizer", path)
    module = importlib.util.module_from_spec(ref_spec)
    ref_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference():
    return load_open_clip_tokenizer_module().SimpleTokenizer()


@pytest.fixture(scope="module")
def ours():
    return Tokenizer.from_open_clip()


def test_vocabulary_constants(ours):
    assert ours.vocab_size == 49408
    assert (ours.start_id, ours.end_id) == (49406, 49407)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_equal_open_clip(ours, reference, prompt):
    got = ours(prompt)
    assert got.dtype == torch.long and got.shape == (1, 77)
    assert torch.equal(got, reference(prompt)), ours.words(prompt)


def test_batch_equals_open_clip(ours, reference):
    got = ours(PROMPTS)
    assert got.shape == (len(PROMPTS), 77)
    assert torch.equal(got, reference(PROMPTS))


def test_known_ids_from_sd21_notes(ours):
    # sd21.md: OpenCLIP gives "dog!!" -> [..., 1929, 748] (the transformers tokenizer: [..., 1929, 0, 0])
    assert ours("dog!!")[0, :5].tolist() == [49406, 1929, 748, 49407, 0]
    assert ours("")[0, :3].tolist() == [49406, 49407, 0]
    assert ours("&amp;amp;").tolist() == ours("&").tolist()


def test_over_length_prompt_is_cut_like_open_clip_with_a_warning(ours, reference):
    long_prompt = "Zebra " + "a " * 99  # 100 BPE tokens; 75 fit between start and end
    with pytest.warns(UserWarning, match=r"100 tokens.*last 25 token\(s\) are dropped.*'Zebra a a"):
        got = ours([PROMPTS[0], long_prompt])
    assert torch.equal(got, reference([PROMPTS[0], long_prompt]))
    assert got[1, -1].item() == 49407 and got[1, 1].item() == reference.encode("zebra")[0]


def test_exactly_75_tokens_is_not_cut(ours):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at the limit
        got = ours("a " * 75)
    assert got[0, 76].item() == 49407 and (got[0, 1:76] == 320).all()


def write_folder(reference, folder: Path) -> Path:
    """vocab.json + merges.txt in the diffusers/transformers layout, from OpenCLIP's BPE."""
    folder.mkdir(parents=True, exist_ok=True)
    renames = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renames.get(k, k): v for k, v in reference.encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = sorted(reference.bpe_ranks, key=reference.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
    return folder


def test_from_folder_equals_open_clip(tmp_path, reference):
    folder = write_folder(reference, tmp_path / "model" / "tokenizer")
    for path in (folder, folder.parent):  # the tokenizer folder itself, or the diffusers root holding it
        tok = Tokenizer.from_folder(path)
        assert tok.vocab_size == 49408
        assert torch.equal(tok(PROMPTS), reference(PROMPTS))


def test_missing_folder_and_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*from_folder.*open_clip_torch"):
        Tokenizer.from_folder(tmp_path / "nowhere")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"merges\.txt"):
        Tokenizer.from_folder(tmp_path / "tok")


def test_broken_folder_files_are_named(tmp_path, reference):
    folder = write_folder(reference, tmp_path / "tok")
    (folder / "merges.txt").write_text("#version: 0.2\ni n\nthree symbols here\n")
    with pytest.raises(ValueError, match=r"merges\.txt:3: expected two symbols"):
        Tokenizer.from_folder(folder)
    (folder / "vocab.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"vocab\.json: invalid JSON"):
        Tokenizer.from_folder(folder)


def test_no_open_clip_names_both_options(monkeypatch):
    monkeypatch.setattr(tokenizer_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"from_folder.*open_clip_torch"):
        Tokenizer.from_open_clip()


def test_bad_prompts_are_refused(ours):
    with pytest.raises(TypeError, match="prompt 1 is a int"):
        ours(["ok", 3])
    with pytest.raises(TypeError, match="str or a list of str"):
        ours(None)
    with pytest.raises(ValueError, match="empty list"):
        ours([])
