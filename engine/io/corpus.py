"""Text for calibration and perplexity: the "wiki" corpus and plain text files.

The wiki corpus is the shortened 2016 English Wikipedia dump that ships inside
the gensim wheel (`WIKI_RELPATH` under the gensim package; 1.7 MB bz2, 6 MB of
XML, 206 pages). We only read that data file: gensim is located with
`importlib.util.find_spec` and never imported (its import pulls in scipy
sparse, smart_open, ... for nothing). Install it with `WIKI_INSTALL_HINT`.

Pipeline:
  1. stream the XML with ElementTree.iterparse, clearing each <page> after use;
  2. keep namespace-0 pages that are not redirects (106 articles);
  3. strip the wiki markup to plain prose with `clean_wikitext` (our own small
     regex + bracket-matching cleaner, see its docstring for the rules);
     articles that clean to nothing are dropped.

Split (by article, so calibration and evaluation never share a sentence):
articles are sorted by page id; the article at position i goes to the
calibration part when i % CALIB_EVERY == CALIB_PHASE, else to the evaluation
part. Page ids are fixed in the file, so the split is deterministic; with
CALIB_EVERY = 4 about a quarter of the articles (and of the text) calibrate:
27 articles / 830,794 characters (~188k SmolLM2 tokens) for calibration,
79 articles / 1,976,477 characters (~438k tokens) for evaluation.

Tokens: `encode_text` gives raw text token ids without special tokens (no BOS),
and `calibration_sequences` cuts `n_seq` non-overlapping chunks of `seq_len`
tokens from the tokenized calibration text (see its docstring).
"""
from __future__ import annotations

import bz2
import functools
import html
import importlib.util
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ..util.files import PathError, input_path

WIKI_RELPATH = ("test", "test_data",
                "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
WIKI_INSTALL_HINT = "pip install --no-deps gensim==4.4.0"
SPLITS = ("calib", "eval")
CALIB_EVERY = 4   # every 4th article (by page id) calibrates ...
CALIB_PHASE = 0   # ... starting with the first one
ARTICLE_SEP = "\n\n"


class DataError(ValueError):
    """A corpus or text file that is missing, unreadable, or too short for the request."""


# ----------------------------------------------------------------------------- wiki markup

# Tags dropped together with their content: formulas, image galleries, code
# listings and the like are not prose (a formula's LaTeX would only add noise).
DROP_TAGS = ("math", "gallery", "source", "syntaxhighlight", "timeline", "score", "imagemap",
             "chem", "ce", "hiero", "graph", "mapframe", "templatedata", "references")
# Sections that hold lists of links and citations, not prose: dropped with their
# subsections (compared case-insensitively with the heading text).
DROP_SECTIONS = ("see also", "references", "external links", "further reading", "bibliography",
                 "notes", "footnotes", "sources", "citations", "notes and references")
# [[Prefix:...]] links removed whole (with any links nested in a caption).
DROP_LINK_PREFIXES = ("file", "image", "category", "media")

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_REF_SELF = re.compile(r"<ref\b[^>]*?/>", re.I)
_REF_PAIR = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.I | re.S)
_DROP_PAIR = re.compile(r"<(%s)\b[^>]*?(?:/>|>.*?</\1\s*>)" % "|".join(DROP_TAGS), re.I | re.S)
_TEMPLATE_TOKENS = re.compile(r"\{\{|\}\}")
# Tables open with "{|" and close with "|}" at the start of a line (":" indents allowed).
_TABLE_TOKENS = re.compile(r"^[ \t:]*(\{\||\|\})", re.M)
_LINK_TOKENS = re.compile(r"\[\[|\]\]")
_DROP_LINK = re.compile(r"\s*(?:%s)\s*:" % "|".join(DROP_LINK_PREFIXES), re.I)
_LANG_LINK = re.compile(r"[a-z]{2,3}(?:-[a-z]+)*:[^|]*\Z")   # [[fr:Anarchisme]]: other wikis
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:(?:https?|ftp):)?//[^\s\]]+(?:[ \t]+([^\]]*))?\]", re.I)
_BR = re.compile(r"<br\s*/?>", re.I)
_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]*)?/?>")
_QUOTES = re.compile(r"'{2,}")            # ''italic'', '''bold''', '''''both'''''
_MAGIC = re.compile(r"__[A-Z]+__")         # __TOC__, __NOTOC__
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_BULLET = re.compile(r"^[*#:;]+\s*")
_EMPTY_PARENS = re.compile(r"\(\s*[,;]?\s*\)")
_SPACES = re.compile(r"[ \t\u00a0]+")


def _matched_spans(text: str, tokens: re.Pattern, opener: str) -> tuple[list, list]:
    """Pairs (start, end) of balanced open/close tokens at any depth, and the stray tokens.

    `tokens` matches both the opener and the closer (its last group, or the whole
    match, is the token). A closer with nothing open and an opener never closed
    are returned as stray spans so the caller can drop the bare tokens.
    """
    stack, pairs, stray = [], [], []
    for m in tokens.finditer(text):
        tok = m.group(m.lastindex or 0)
        if tok == opener:
            stack.append(m.start())
        elif stack:
            pairs.append((stack.pop(), m.end()))
        else:
            stray.append((m.start(), m.end()))
    stray.extend((s, s + len(opener)) for s in stack)
    return pairs, stray


def _remove_spans(text: str, spans: list) -> str:
    """Delete the union of the (start, end) spans."""
    if not spans:
        return text
    out, pos = [], 0
    for s, e in sorted(spans):
        if e <= pos:
            continue              # nested inside a span already removed
        out.append(text[pos:max(s, pos)])
        pos = e
    out.append(text[pos:])
    return "".join(out)


def _strip_nested(text: str, tokens: re.Pattern, opener: str) -> str:
    pairs, stray = _matched_spans(text, tokens, opener)
    return _remove_spans(text, pairs + stray)


def _strip_special_links(text: str) -> str:
    """Remove [[File:..]], [[Image:..]], [[Category:..]], [[Media:..]] and interlanguage links."""
    pairs, _ = _matched_spans(text, _LINK_TOKENS, "[[")
    drop = [(s, e) for s, e in pairs
            if _DROP_LINK.match(text, s + 2) or _LANG_LINK.fullmatch(text, s + 2, e - 2)]
    return _remove_spans(text, drop)


def _link_label(m: re.Match) -> str:
    target, _, label = m.group(1).partition("|")
    if "|" in label:          # [[a|b|c]] (only images use several pipes): keep the last part
        label = label.rsplit("|", 1)[1]
    return label if label.strip() else target.lstrip(":")


def _lines_to_prose(text: str) -> str:
    """Headings -> their text, bullets dropped, empty sections and table remnants removed."""
    rows = []  # (heading level or 0, text)
    skip_below = 0   # inside a DROP_SECTIONS section of this level (0: not skipping)
    for line in text.split("\n"):
        line = _SPACES.sub(" ", line).strip()
        h = _HEADING.match(line)
        if h:
            level, title = len(h.group(1)), h.group(2)
            if skip_below and level > skip_below:
                continue           # a subsection of a dropped section
            skip_below = level if title.casefold() in DROP_SECTIONS else 0
            if title and not skip_below:
                rows.append((level, title))
            continue
        if skip_below:
            continue
        if line.startswith("|") or line == "----":
            continue               # remnant of an unbalanced table, or a horizontal rule
        line = _BULLET.sub("", line)
        line = _SPACES.sub(" ", _EMPTY_PARENS.sub("", line)).strip()
        rows.append((0, line))
    # A heading whose section is empty after cleaning (References, External links, ...)
    # is dropped: the next non-blank row is a heading of the same or a higher level.
    keep, next_level = [], None    # next non-blank row below: None end, 0 prose, k heading
    for level, line in reversed(rows):
        if level:
            if next_level is None or 0 < next_level <= level:
                continue
            next_level = level
        elif line:
            next_level = 0
        keep.append(line)
    out = "\n".join(reversed(keep))
    return re.sub(r"\n{3,}", "\n\n", out).strip()


def clean_wikitext(markup: str) -> str:
    """Wiki markup -> plain prose. Rules, in order:

    comments; <ref>...</ref> and <ref/>; tags in DROP_TAGS with their content
    (<math>, <gallery>, ...); nested {{templates}} (bracket matching, any depth);
    {| tables |} (line-anchored, nested); [[File:/Image:/Category:/Media:]] and
    interlanguage [[xx:...]] links whole; [[a|b]] -> b, [[a]] -> a; external
    [url label] -> label, bare [url] -> nothing; <br> -> space; other tags
    stripped, content kept; ''/''' quotes; __MAGIC__ words; "== X ==" -> "X";
    bullet/indent markers; HTML entities (html.unescape, nbsp -> space); empty
    "()" left by removed templates; the DROP_SECTIONS sections (See also,
    References, External links, ...: link lists, not prose); headings of empty
    sections; runs of spaces and of blank lines. Stray unbalanced {{, }}, {|, |} tokens are dropped.
    """
    t = _COMMENT.sub("", markup)
    t = _REF_SELF.sub("", t)
    t = _REF_PAIR.sub("", t)
    t = _DROP_PAIR.sub("", t)
    t = _strip_nested(t, _TEMPLATE_TOKENS, "{{")
    t = _strip_nested(t, _TABLE_TOKENS, "{|")
    t = _strip_special_links(t)
    prev = None
    while prev != t:             # innermost first; leftovers of malformed nesting
        prev, t = t, _INNER_LINK.sub(_link_label, t)
    t = _EXT_LINK.sub(lambda m: m.group(1) or "", t)
    t = _BR.sub(" ", t)
    t = _TAG.sub("", t)
    t = _QUOTES.sub("", t)
    t = _MAGIC.sub("", t)
    t = html.unescape(t).replace("\u00a0", " ")
    return _lines_to_prose(t)


# ----------------------------------------------------------------------------- wiki corpus

def wiki_path() -> Path:
    """Path of the bz2 dump inside the installed gensim package (gensim is not imported)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the wiki corpus needs the gensim package's data file; install it "
                        f"with: {WIKI_INSTALL_HINT}")
    for root in spec.submodule_search_locations:
        p = Path(root).joinpath(*WIKI_RELPATH)
        if p.is_file():
            return p
    raise DataError(f"gensim is installed but its wiki data file {'/'.join(WIKI_RELPATH)} is "
                    f"missing; reinstall with: {WIKI_INSTALL_HINT}")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _parse_dump(path: Path) -> list[tuple[int, str, str]]:
    """(page id, title, raw wikitext) of every namespace-0, non-redirect page."""
    pages = []
    try:
        with bz2.open(path, "rb") as f:
            for _, el in ET.iterparse(f, events=("end",)):
                if _local(el.tag) != "page":
                    continue
                fields = {_local(c.tag): c for c in el}
                ns = fields.get("ns")
                if ns is not None and (ns.text or "").strip() == "0" and "redirect" not in fields:
                    rev = fields.get("revision")
                    text = None
                    if rev is not None:
                        text = next((c.text for c in rev if _local(c.tag) == "text"), None)
                    pages.append((int(fields["id"].text), fields["title"].text or "", text or ""))
                el.clear()    # keep memory flat: the page's text is no longer needed
    except (OSError, EOFError, ET.ParseError, KeyError, ValueError) as e:
        raise DataError(f"wiki corpus {path} is unreadable ({type(e).__name__}: {e}); "
                        f"reinstall with: {WIKI_INSTALL_HINT}") from None
    return pages


@functools.lru_cache(maxsize=1)
def _wiki_articles_cached() -> tuple[tuple[int, str, str], ...]:
    path = wiki_path()
    arts = []
    for pid, title, raw in sorted(_parse_dump(path)):
        text = clean_wikitext(raw)
        if text:
            arts.append((pid, title, text))
    if not arts:
        raise DataError(f"wiki corpus {path} holds no articles; reinstall with: {WIKI_INSTALL_HINT}")
    return tuple(arts)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def split_of(index: int) -> str:
    """The split of the article at `index` in page-id order."""
    return "calib" if index % CALIB_EVERY == CALIB_PHASE else "eval"


def wiki_articles(split: str | None = None) -> list[tuple[str, str]]:
    """(title, cleaned text) of the wiki articles in page-id order; all, or one split's."""
    if split is not None:
        _check_split(split)
    return [(title, text) for i, (_, title, text) in enumerate(_wiki_articles_cached())
            if split is None or split_of(i) == split]


def wiki_text(split: str) -> str:
    """The articles of one split ("calib" or "eval") joined by a blank line."""
    _check_split(split)
    return ARTICLE_SEP.join(text for _, text in wiki_articles(split))


def load_text_file(path: str | os.PathLike) -> str:
    """A UTF-8 text file (a BOM is allowed; CRLF -> LF), with one clear error when unusable."""
    try:
        p = input_path(path, "the text file")
    except PathError as e:
        raise DataError(f"text file: {e}") from None
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"text file {p} cannot be read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"text file {p} is not UTF-8 text (invalid byte at offset {e.start})") from None
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise DataError(f"text file {p} is empty")
    return text


# ----------------------------------------------------------------------------- tokens

def encode_text(tokenizer, text: str) -> np.ndarray:
    """Token ids (T,) int32 of `text`, without special tokens (no BOS/EOS).

    `tokenizer` is a tokenizers.Tokenizer (its Encoding's `.ids` are used) or any
    object whose `encode(text)` returns a sequence of ints.
    """
    try:
        enc = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:         # a simple tokenizer without the keyword
        enc = tokenizer.encode(text)
    ids = getattr(enc, "ids", enc)
    return np.asarray(ids, dtype=np.int32).reshape(-1)  # (T,)


def calibration_sequences(tokenizer, n_seq: int, seq_len: int, split: str = "calib",
                          text: str | None = None, seed: int = 0) -> np.ndarray:
    """`n_seq` non-overlapping chunks of `seq_len` tokens: (n_seq, seq_len) int32.

    The text is `text` when given, else `wiki_text(split)`. Its T tokens are cut
    into n_seq equal strides of T // n_seq tokens; chunk i starts at
    i·stride + offset_i with offset_i drawn uniformly from [0, stride − seq_len]
    by np.random.default_rng(seed). So the chunks cover the whole text (not just
    its first articles), never overlap, and depend only on (text, tokenizer, seed).
    """
    for name, v in (("n_seq", n_seq), ("seq_len", seq_len)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise DataError(f"{name} must be a positive integer, got {v!r}")
    if text is None:
        text = wiki_text(split)
    tokens = encode_text(tokenizer, text)  # (T,)
    need = n_seq * seq_len
    if len(tokens) < need:
        raise DataError(f"calibration text has {len(tokens)} tokens, fewer than the "
                        f"{n_seq} x {seq_len} = {need} requested; use fewer or shorter sequences")
    stride = len(tokens) // n_seq
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, stride - seq_len + 1, size=n_seq)  # (n_seq,)
    starts = np.arange(n_seq) * stride + offsets                 # (n_seq,)
    idx = starts[:, None] + np.arange(seq_len)[None, :]          # (n_seq, seq_len)
    return tokens[idx].astype(np.int32)
