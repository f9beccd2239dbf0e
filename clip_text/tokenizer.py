"""The CLIP byte-pair-encoding tokenizer, with the rules of the model it feeds.

Both Stable Diffusion families use CLIP's BPE (49,408 ids, start 49406, end 49407), but were trained
with different tokenizers, so the ids differ in two places; the checkpoint, not the user, says which:

- `OPEN_CLIP` (SD-2.x, trained with OpenCLIP's tokenizer): cleanup by ftfy.fix_text (repairs
  mojibake), html.unescape twice (web prompts are often double-escaped, "&amp;amp;"), whitespace
  collapsed, lower case; padding with 0.
- `TRANSFORMERS` (SD-1.x, trained with transformers' CLIPTokenizer): cleanup by unicode NFC, runs of
  whitespace to one space, lower case (no ftfy, no html unescape: "&amp;" stays five characters);
  padding with the end token 49407.

Then, for both: split into words with CLIP's pattern (contractions, letter runs, single digits,
punctuation runs; whitespace dropped); every word as UTF-8 bytes, each byte shown as one printable
unicode character (the GPT-2 table), the last marked end-of-word with "</w>", merged by the BPE ranks;
[start, ids..., end] padded to 77. The splitting and merging run in the `tokenizers` library (Rust);
we only configure it.

Neither family is fed the transformers CLIPTokenizer of an SD-2 `tokenizer/` folder: it skips the
html unescape and turns every literal "!" into its pad token "!", so "dog!!" gives [..., 1929, 0, 0]
there and [..., 1929, 748] in OpenCLIP, whose ids SD-2 was trained on.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import re
import warnings
from pathlib import Path
from typing import Sequence

import ftfy
import tokenizers
import torch
from tokenizers import Regex, models, normalizers, pre_tokenizers

CONTEXT_LENGTH = 77
OPEN_CLIP = "open_clip"  # SD-2.x
TRANSFORMERS = "transformers"  # SD-1.x
RULES = (OPEN_CLIP, TRANSFORMERS)
PAD_ID = 0  # OpenCLIP pads with 0 (the diffusers folder names the pad token "!", which is also id 0)
START_TOKEN = "<start_of_text>"
END_TOKEN = "<end_of_text>"
# A diffusers/transformers folder spells the two special tokens "<|startoftext|>", "<|endoftext|>" (same
# ids, 49406/49407). Each rule set keeps its own tokenizer's spelling, so a prompt spelling one out gets its id.
SPECIAL_NAMES = {OPEN_CLIP: (START_TOKEN, END_TOKEN), TRANSFORMERS: ("<|startoftext|>", "<|endoftext|>")}
# bpe_simple_vocab_16e6.txt.gz: a header line, then merges; CLIP uses the first 49152 - 256 - 2 of them
# so that 256 bytes + 256 end-of-word bytes + merges + 2 specials = 49408 ids.
OPEN_CLIP_MERGES = 49152 - 256 - 2
OPEN_CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP's word pattern (see word_pattern for the special-token names in front of it).
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def word_pattern(start: str, end: str) -> str:
    """CLIP's word pattern with the two special-token names first, so a prompt spelling one out gets its id.
    The text is already lower case, so OpenCLIP's IGNORECASE flag changes nothing here."""
    return "|".join(re.escape(name) for name in (start, end)) + "|" + WORD_PATTERN

WHERE_TO_GET_IT = (
    "either pass a diffusers `tokenizer/` folder (vocab.json + merges.txt) to Tokenizer.from_folder(path), "
    "or install the package that ships CLIP's BPE file: pip install --no-deps open_clip_torch "
    "(then Tokenizer.from_open_clip() reads it without importing open_clip)"
)


def byte_to_char() -> dict[int, str]:
    """The GPT-2/CLIP table showing each of the 256 byte values as one printable unicode character.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, soft hyphen, ...) are
    shown as chr(256), chr(257), ... in byte order, so no BPE symbol is whitespace or invisible.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def rules_from_folder(folder: Path) -> str:
    """TRANSFORMERS when the folder's pad token is "<|endoftext|>" (SD-1.x), else OPEN_CLIP (SD-2.x pads with "!")."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = folder / name
        if not f.is_file():
            continue
        try:
            pad = json.loads(f.read_text(encoding="utf-8")).get("pad_token")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"{f}: not a JSON object ({e})") from None
        if isinstance(pad, dict):  # {"content": "<|endoftext|>", "lstrip": false, ...}
            pad = pad.get("content")
        if pad is not None:
            return TRANSFORMERS if pad == "<|endoftext|>" else OPEN_CLIP
    return OPEN_CLIP


def clean(text: str) -> str:
    """OpenCLIP's 'lower' cleanup: ftfy, html unescape twice, whitespace collapsed and stripped, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()  # str.split() drops every run of whitespace, ends included


def transformers_normalizer() -> normalizers.Normalizer:
    """transformers' CLIPTokenizer cleanup (SD-1.x): unicode NFC, whitespace runs to one space, lower case."""
    return normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])


class Tokenizer:
    """prompts -> LongTensor [B, 77] of CLIP token ids, by OpenCLIP's rules (SD-2.x) or transformers' (SD-1.x)."""

    def __init__(
        self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *, source: str = "vocab", rules: str = OPEN_CLIP,
    ):
        if rules not in RULES:
            raise ValueError(f"{source}: tokenizer rules {rules!r} are not one of {RULES}")
        start_name, end_name = SPECIAL_NAMES[rules]
        # Either spelling of the two specials in the vocabulary becomes this rule set's spelling.
        to_rule = {START_TOKEN: start_name, "<|startoftext|>": start_name, END_TOKEN: end_name, "<|endoftext|>": end_name}
        vocab = {to_rule.get(k, k): v for k, v in vocab.items()}
        for name in (start_name, end_name):
            if name not in vocab:
                raise ValueError(f"{source}: the vocabulary has no {name!r} token")
        for rank, (a, b) in enumerate(merges):
            for part in (a, b, a + b):
                if part not in vocab:
                    raise ValueError(f"{source}: merge #{rank} ({a!r} {b!r}) uses {part!r}, which is not in the vocabulary")
        self.source, self.rules = source, rules
        self.vocab_size = max(vocab.values()) + 1
        self.start_id = vocab[start_name]
        self.end_id = vocab[end_name]
        # SD-2.x was trained on OpenCLIP's zero padding, SD-1.x on transformers' padding with the end token.
        self.pad_id = PAD_ID if rules == OPEN_CLIP else self.end_id
        self.context_length = CONTEXT_LENGTH
        self._normalizer = transformers_normalizer() if rules == TRANSFORMERS else None

        # Two passes, both in Rust. The word split runs first, on its own, because only it knows where
        # a special-token name counts as one (after punctuation, "!<start_of_text>", the punctuation
        # run swallows the "<" and the name is plain text). Its words, joined by single spaces, go to
        # the BPE tokenizer, which cuts out the special names that survived as whole words (added
        # tokens), splits the rest at the joining spaces and byte-pair-encodes each word.
        # invert=True: the pattern's matches are the words, everything between (whitespace) is dropped.
        self._split = pre_tokenizers.Split(Regex(word_pattern(start_name, end_name)), behavior="removed", invert=True)
        bpe = models.BPE(vocab=dict(vocab), merges=list(merges), end_of_word_suffix="</w>")
        tok = tokenizers.Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(" ", behavior="removed"),  # the joining spaces only (no word holds one)
            # bytes -> the byte_to_char symbols. OpenCLIP: no regex of its own (the split above is CLIP's);
            # transformers' CLIPTokenizer also runs the byte-level GPT-2 split after CLIP's: so do we.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=rules == TRANSFORMERS),
        ])
        tok.add_special_tokens([start_name, end_name])
        self._tok = tok

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_folder(cls, path: str | Path, rules: str | None = None) -> "Tokenizer":
        """A diffusers `tokenizer/` folder (vocab.json + merges.txt), or a diffusers model folder holding one.

        `rules` None: read from the folder's pad token (special_tokens_map.json or tokenizer_config.json):
        "<|endoftext|>" is SD-1.x's tokenizer (TRANSFORMERS rules), anything else (SD-2.x: "!") OPEN_CLIP."""
        path = Path(path)
        if (path / "tokenizer" / "vocab.json").is_file() and not (path / "vocab.json").is_file():
            path = path / "tokenizer"
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such tokenizer folder; {WHERE_TO_GET_IT}")
        vocab_file, merges_file = path / "vocab.json", path / "merges.txt"
        for f in (vocab_file, merges_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing (a CLIP tokenizer folder holds vocab.json and merges.txt); {WHERE_TO_GET_IT}")
        try:
            raw = json.loads(vocab_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{vocab_file}: invalid JSON ({e})") from None
        if not isinstance(raw, dict) or not all(isinstance(v, int) for v in raw.values()):
            raise ValueError(f"{vocab_file}: expected a JSON object of token -> integer id")
        vocab = raw  # the two specials are renamed to the rules' spelling in __init__

        merges = []
        for n, line in enumerate(merges_file.read_text(encoding="utf-8").split("\n"), start=1):
            if not line.strip() or (n == 1 and line.startswith("#version")):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{merges_file}:{n}: expected two symbols per merge line, got {line!r}")
            merges.append((parts[0], parts[1]))
        return cls(vocab, merges, source=str(path), rules=rules or rules_from_folder(path))

    @classmethod
    def from_open_clip(cls, rules: str = OPEN_CLIP) -> "Tokenizer":
        """CLIP's BPE file as shipped in the installed open_clip_torch package (not imported: it needs torchvision)."""
        spec = importlib.util.find_spec("open_clip")  # a top-level name: found on disk, not executed
        folders = list(spec.submodule_search_locations or []) if spec is not None else []
        files = [Path(d) / OPEN_CLIP_BPE_FILE for d in folders]
        found = [f for f in files if f.is_file()]
        if not found:
            where = f" (looked in {', '.join(map(str, folders))})" if folders else " (package open_clip not installed)"
            raise FileNotFoundError(f"CLIP BPE file {OPEN_CLIP_BPE_FILE} not found{where}; {WHERE_TO_GET_IT}")
        return cls.from_bpe_file(found[0], rules)

    @classmethod
    def from_bpe_file(cls, path: str | Path, rules: str = OPEN_CLIP) -> "Tokenizer":
        """OpenCLIP's `bpe_simple_vocab_16e6.txt.gz`, turned into a vocabulary in OpenCLIP's id order."""
        path = Path(path)
        lines = gzip.open(path).read().decode("utf-8").split("\n")
        chosen = lines[1 : 1 + OPEN_CLIP_MERGES]  # line 0 is a header
        if len(chosen) != OPEN_CLIP_MERGES:
            raise ValueError(f"{path}: {len(chosen)} merge lines, CLIP needs {OPEN_CLIP_MERGES}")
        merges = []
        for n, line in enumerate(chosen, start=2):
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{n}: expected two symbols per merge line, got {line!r}")
            merges.append((parts[0], parts[1]))
        # Id order: the 256 byte symbols, the same with "</w>", each merge's result, then the specials.
        chars = list(byte_to_char().values())
        tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [START_TOKEN, END_TOKEN]
        vocab = {t: i for i, t in enumerate(tokens)}  # a repeated token keeps its last id, as in OpenCLIP
        return cls(vocab, merges, source=str(path), rules=rules)

    @classmethod
    def load(cls, folder: str | Path | None = None, rules: str | None = None) -> "Tokenizer":
        """From `folder` when given (rules from the folder unless given), otherwise from the installed
        open_clip_torch package (OpenCLIP's rules unless given)."""
        return cls.from_folder(folder, rules) if folder is not None else cls.from_open_clip(rules or OPEN_CLIP)

    # ------------------------------------------------------------------ encoding

    def clean(self, prompt: str) -> str:
        """The prompt after this rule set's cleanup (see the module docstring)."""
        return clean(prompt) if self._normalizer is None else self._normalizer.normalize_str(prompt)

    def words(self, prompt: str) -> list[str]:
        """The cleaned prompt split into CLIP's words (before byte-pair encoding)."""
        return [w for w, _ in self._split.pre_tokenize_str(self.clean(prompt))]

    def encode(self, prompt: str) -> list[int]:
        """BPE ids of one prompt, without start/end tokens or truncation."""
        return self._tok.encode(" ".join(self.words(prompt)), add_special_tokens=False).ids

    def __call__(self, prompts: list[str] | str) -> torch.LongTensor:
        """[B, 77]: start, ids, end, padding (0 or the end id, by the rules). Over-long prompts keep their
        first 75 ids (OpenCLIP: cut to 77 and the 77th id becomes `end`; transformers: truncation to 77)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"Tokenizer: prompts must be a str or a list of str, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("Tokenizer: empty list of prompts")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"Tokenizer: prompt {i} is a {type(p).__name__}, not a str: {p!r}")
        encoded = self._tok.encode_batch([" ".join(self.words(p)) for p in prompts], add_special_tokens=False)
        out = torch.full((len(prompts), self.context_length), self.pad_id, dtype=torch.long)
        room = self.context_length - 2
        for i, (prompt, enc) in enumerate(zip(prompts, encoded)):
            ids = enc.ids
            if len(ids) > room:
                start = prompt[:60] + ("..." if len(prompt) > 60 else "")
                warnings.warn(
                    f"prompt {i} has {len(ids)} tokens, CLIP reads at most {room}: the last "
                    f"{len(ids) - room} token(s) are dropped (prompt starts {start!r})",
                    stacklevel=2,
                )
                ids = ids[:room]
            row = [self.start_id, *ids, self.end_id]
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out
