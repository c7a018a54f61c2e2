import importlib.util

import numpy as np
import pytest

from engine.io import corpus as data
from engine.io.corpus import DataError, calibration_sequences, clean_wikitext, encode_text, load_text_file


# ----------------------------------------------------------------------------- markup cleaner

@pytest.mark.parametrize("markup, prose", [
    ("A {{convert|3|km|{{abbr|mi}}}} walk.", "A walk."),
    ("{{Infobox person\n| name = {{lang|fr|Jean}}\n| born = {{birth date|1900|1|1}}\n}}\nJean was born.",
     "Jean was born."),
    ("Stray }} brace and {{ open.", "Stray brace and open."),
    ("See [[Paris]] and [[Paris, Texas|the other one]].", "See Paris and the other one."),
    ("[[apple]]s and [[:Category:Fruit|fruit pages]]", "apples and fruit pages"),
    ("Text.<ref>Smith, {{cite book|title=X}} p. 3.</ref> More.<ref name=\"a\" /> End.<ref name=b/>",
     "Text. More. End."),
    ("A<ref name=\"x\">one</ref>B<ref>two\nlines</ref>C", "ABC"),
    ("Before\n{| class=\"wikitable\"\n|-\n| a || {{flag|X}}\n{|\n| nested\n|}\n|}\nAfter", "Before\n\nAfter"),
    ("[[File:Map.png|thumb|A map of [[France]] and [[Spain|Iberia]]]]Real text.", "Real text."),
    ("[[Image:X.jpg|left]]\nBody\n[[Category:Things]]\n[[fr:Chose]]\n[[de:Ding]]", "Body"),
    ("Visit [http://example.com the site] or [https://x.org/a?b=1].", "Visit the site or ."),
    ("'''Bold''' and ''italic'' and '''''both'''''.", "Bold and italic and both."),
    ("Intro.\n\n== History ==\nOld.\n\n===Early===\nOlder.", "Intro.\n\nHistory\nOld.\n\nEarly\nOlder."),
    ("* one\n** two\n# three\n: indented\n; term", "one\ntwo\nthree\nindented\nterm"),
    ("Tom &amp; Jerry&nbsp;show &ndash; 5 &lt; 6", "Tom & Jerry show – 5 < 6"),
    ("a<!-- hidden [[x]] {{y}} -->b<!-- unterminated", "ab"),
    ("x<sub>2</sub>O and E=mc<sup>2</sup>, line<br />break", "x2O and E=mc2, line break"),
    ("The formula <math>\\frac{a}{b}</math> holds.", "The formula holds."),
    ("The word ({{IPA|x}}) is old.", "The word is old."),
    ("__NOTOC__Text\n----\nMore", "Text\nMore"),
    ("a\n\n\n\n\nb", "a\n\nb"),
])
def test_clean_wikitext(markup, prose):
    assert clean_wikitext(markup) == prose


def test_clean_drops_reference_sections_and_empty_headings():
    markup = ("Lead.\n\n== Life ==\nLived.\n\n== Works ==\n{{main|List}}\n\n=== Poems ===\nVerse.\n\n"
              "== See also ==\n* [[Other]]\n\n== References ==\n{{reflist}}\n=== Notes ===\nn\n\n"
              "== External links ==\n* [http://x.org X]\n\n== Legacy ==\n{{empty}}\n")
    assert clean_wikitext(markup) == "Lead.\n\nLife\nLived.\n\nWorks\n\nPoems\nVerse."


def test_clean_plain_text_is_unchanged():
    text = "Plain prose, with punctuation: (a), [b], x < y > z.\n\nSecond paragraph."
    assert clean_wikitext(text) == text


# ----------------------------------------------------------------------------- text files

def test_load_text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes("\ufeffline one\r\nline two é\r\n".encode("utf-8"))
    assert load_text_file(p) == "line one\nline two é\n"
    assert load_text_file(str(p)) == "line one\nline two é\n"


def test_load_text_file_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_text_file(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="not a regular file"):
        load_text_file(tmp_path)
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(DataError, match="empty"):
        load_text_file(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8.*offset 3"):
        load_text_file(tmp_path / "latin1.txt")
    assert issubclass(DataError, ValueError)


# ----------------------------------------------------------------------------- tokens

class CharTokenizer:
    """One token per character: token id = code point (a plain `encode` returning a list)."""

    def encode(self, text):
        return [ord(c) for c in text]


def test_calibration_sequences_are_deterministic_disjoint_chunks():
    text = "".join(chr(0x4E00 + i) for i in range(5000))   # token id = position + 0x4E00
    seqs = calibration_sequences(CharTokenizer(), 8, 100, text=text, seed=3)
    assert seqs.shape == (8, 100) and seqs.dtype == np.int32
    starts = seqs[:, 0] - 0x4E00
    assert np.all(np.diff(seqs, axis=1) == 1)                 # contiguous slices
    assert np.all(np.diff(starts) >= 100)                     # in order, never overlapping
    assert starts[-1] + 100 <= 5000
    assert np.array_equal(seqs, calibration_sequences(CharTokenizer(), 8, 100, text=text, seed=3))
    assert not np.array_equal(seqs, calibration_sequences(CharTokenizer(), 8, 100, text=text, seed=4))
    exact = calibration_sequences(CharTokenizer(), 50, 100, text=text)   # fills the text exactly
    assert np.array_equal(exact.reshape(-1) - 0x4E00, np.arange(5000))


def test_calibration_sequences_errors():
    with pytest.raises(DataError, match="fewer than the 4 x 30 = 120"):
        calibration_sequences(CharTokenizer(), 4, 30, text="x" * 119)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(DataError, match="n_seq"):
            calibration_sequences(CharTokenizer(), bad, 4, text="x" * 100)
        with pytest.raises(DataError, match="seq_len"):
            calibration_sequences(CharTokenizer(), 4, bad, text="x" * 100)


def test_encode_text_with_a_tokenizers_tokenizer_adds_no_special_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    tok = Tokenizer(models.WordLevel({"<s>": 0, "the": 1, "cat": 2, "<unk>": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    assert tok.encode("the cat").ids == [0, 1, 2]              # the BOS we must not get
    ids = encode_text(tok, "the cat the dog")
    assert ids.dtype == np.int32 and ids.tolist() == [1, 2, 1, 3]


# ----------------------------------------------------------------------------- wiki corpus

def test_missing_gensim_gives_install_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gensim" else real(name, *a))
    with pytest.raises(DataError, match="pip install --no-deps gensim==4.4.0"):
        data.wiki_path()


def test_bad_split_name():
    with pytest.raises(DataError, match="calib, eval"):
        data.wiki_text("train")


def test_split_rule():
    assert [data.split_of(i) for i in range(8)] == ["calib", "eval", "eval", "eval"] * 2


@pytest.fixture(scope="module")
def wiki():
    try:
        data.wiki_path()
    except DataError as e:
        pytest.skip(str(e))
    return data.wiki_articles()


@pytest.mark.slow
def test_wiki_split_is_deterministic_disjoint_and_complete(wiki):
    calib, ev = data.wiki_articles("calib"), data.wiki_articles("eval")
    assert calib and ev
    assert len(calib) == -(-len(wiki) // data.CALIB_EVERY)
    assert {t for t, _ in calib}.isdisjoint({t for t, _ in ev})
    assert sorted(calib + ev) == sorted(wiki)
    # no paragraph of substance is shared between the two texts
    paras = lambda text: {p for p in text.split("\n\n") if len(p) > 200}
    calib_text, eval_text = data.wiki_text("calib"), data.wiki_text("eval")
    assert paras(calib_text).isdisjoint(paras(eval_text))
    data._wiki_articles_cached.cache_clear()                   # re-parse from the file
    assert data.wiki_articles("calib") == calib
    assert data.wiki_text("eval") == eval_text


@pytest.mark.slow
def test_wiki_text_is_clean_prose(wiki):
    assert len(wiki) > 100
    text = data.wiki_text("calib") + data.wiki_text("eval")
    for junk in ("{{", "}}", "[[", "]]", "<ref", "</", "{|", "&amp;", "&nbsp;", "'''", "[http"):
        assert junk not in text, junk
    titles = [t for t, _ in wiki]
    assert "Anarchism" in titles and "AccessibleComputing" not in titles   # the latter is a redirect
    assert "\n\n\n" not in text
    assert all(t.strip() == t and t for _, t in wiki)
