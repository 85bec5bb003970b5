"""The data pipelines in examples/ run end to end on the staged corpora (shared/data).

Each test runs a prepare script into a temporary directory, as a user would, and checks its
outputs: binarized splits, dictionaries, line counts, and that the BPE text round-trips to the
tokenized input. The staged data is found through FAIRSEQ_DAT_SHARED (default: the repo's
../shared); tests skip, saying so, when it is absent.
"""
import io
import lzma
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FAIRSEQ_DAT_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
MOSES_COMPAT = REPO / "examples" / "common" / "moses_compat.py"


def need_staged(*names):
    for name in names:
        if not (DATA / name).exists():
            pytest.skip(f"staged data not found: {DATA / name} (set FAIRSEQ_DAT_SHARED to the shared/ folder)")


def run_script(script, *args, env=None, timeout=300):
    """Run a prepare script with the repo's venv first on PATH; return (CompletedProcess, seconds)."""
    full_env = dict(os.environ)
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    full_env.update(env or {})
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / script), *map(str, args)], env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def check_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def xz_lines(path):
    with lzma.open(path, "rt", encoding="utf-8", newline="\n") as f:
        return f.read().split("\n")[:-1]


def text_lines(path):
    with open(path, encoding="utf-8", newline="\n") as f:
        return f.read().split("\n")[:-1]


def squeeze_spaces(line):
    """What apply-bpe keeps of a line's spacing: single spaces, no leading/trailing ones."""
    return " ".join(t for t in line.split(" ") if t)


def unbpe(line):
    return re.sub(r"(@@ )|(@@ ?$)", "", line)


def load_split(bin_dir, split, lang, pair):
    from fairseq.data import Dictionary, data_utils

    d = Dictionary.load(str(bin_dir / f"dict.{lang}.txt"))
    ds = data_utils.load_indexed_dataset(str(bin_dir / f"{split}.{pair}.{lang}"), d, dataset_impl="mmap")
    assert ds is not None, f"no binarized {split}.{pair}.{lang} in {bin_dir}"
    return d, ds


def check_binarized(bin_dir, bpe_dir, splits, pair, n_check=50):
    """Every split's .bin/.idx exists and decodes back to the BPE text it came from."""
    src, tgt = pair.split("-")
    for split in splits:
        for lang in (src, tgt):
            for ext in ("bin", "idx"):
                assert (bin_dir / f"{split}.{pair}.{lang}.{ext}").is_file(), f"missing {split}.{pair}.{lang}.{ext}"
            d, ds = load_split(bin_dir, split, lang, pair)
            bpe = text_lines(bpe_dir / f"{split}.{lang}")
            assert len(ds) == len(bpe), f"{split}.{lang}: {len(ds)} binarized vs {len(bpe)} text lines"
            for i in range(min(n_check, len(bpe))):
                assert d.string(ds[i]) == squeeze_spaces(bpe[i]) or "<unk>" in d.string(ds[i])


# --------------------------------------------------------------------------- Multi30k
@pytest.fixture(scope="module")
def multi30k(tmp_path_factory):
    need_staged("multi30k-de-en/train.de.xz")
    out = tmp_path_factory.mktemp("m30k") / "data-bin" / "multi30k_de_en"
    proc, seconds = run_script("examples/multi30k_de_en/prepare.sh", DATA, out, env={"LIMIT": "2000"}, timeout=60)
    check_ok(proc)
    return out, out.parent / "multi30k_de_en.bpe", proc, seconds


def test_multi30k_binarized_splits_and_dictionary(multi30k):
    out, bpe_dir, _, seconds = multi30k
    assert seconds < 60, f"LIMIT=2000 run took {seconds:.0f}s"
    splits = ["train", "valid", "test", "test1", "test2", "test3"]
    check_binarized(out, bpe_dir, splits, "de-en")
    de, en = text_lines(out / "dict.de.txt"), text_lines(out / "dict.en.txt")
    assert de == en, "--joined-dictionary should give identical dictionaries"
    assert len(en) > 100
    assert (bpe_dir / "code").is_file() and (bpe_dir / "MANIFEST.txt").is_file()


def test_multi30k_line_counts(multi30k):
    _, bpe_dir, _, _ = multi30k
    expected = {"train": 2000, "valid": 1014, "test": 1000, "test1": 1000, "test2": 461, "test3": 1071}
    for split, n in expected.items():
        for lang in ("de", "en"):
            assert len(text_lines(bpe_dir / f"{split}.{lang}")) == n, f"{split}.{lang}"


def test_multi30k_bpe_round_trips_to_tokenized_source(multi30k):
    _, bpe_dir, _, _ = multi30k
    stems = {"train": "train", "valid": "valid", "test": "test", "test1": "extra/test_2017_flickr",
             "test2": "extra/test_2017_mscoco", "test3": "extra/test_2018_flickr"}
    for split, stem in stems.items():
        for lang in ("de", "en"):
            source = xz_lines(DATA / "multi30k-de-en" / f"{stem}.{lang}.xz")
            bpe = text_lines(bpe_dir / f"{split}.{lang}")
            # the script only squeezes runs of spaces (one train.en line, one test3.en line)
            assert [unbpe(x) for x in bpe] == [squeeze_spaces(x) for x in source[:len(bpe)]], f"{split}.{lang}"
            assert text_lines(bpe_dir / "tok" / f"{split}.{lang}") == [unbpe(x) for x in bpe]
            assert any("@@ " in x for x in bpe), f"{split}.{lang}: no word was split"


def test_multi30k_is_idempotent(multi30k):
    out, _, _, _ = multi30k
    before = (out / "dict.en.txt").stat().st_mtime_ns
    proc, _ = run_script("examples/multi30k_de_en/prepare.sh", DATA, out, env={"LIMIT": "2000"})
    check_ok(proc)
    assert "nothing to do" in proc.stdout
    assert (out / "dict.en.txt").stat().st_mtime_ns == before


def test_multi30k_missing_input_is_named(tmp_path):
    fake = tmp_path / "shared_data"
    (fake / "multi30k-de-en").mkdir(parents=True)
    proc, _ = run_script("examples/multi30k_de_en/prepare.sh", fake, tmp_path / "out")
    assert proc.returncode != 0
    assert "missing input file" in proc.stderr and "multi30k-de-en/train.de.xz" in proc.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- IWSLT14 sample
@pytest.fixture(scope="module")
def iwslt_sample(tmp_path_factory):
    need_staged("iwslt14-de-en/bpe10k/code.xz")
    out = tmp_path_factory.mktemp("iwslt") / "iwslt14_de_en_sample"
    proc, seconds = run_script("examples/iwslt14_de_en/prepare.sh", DATA, out, env={"LIMIT": "1000"}, timeout=120)
    check_ok(proc)
    return out, out.parent / "iwslt14_de_en_sample.bpe", proc


def test_iwslt_sample_binarized_and_counts(iwslt_sample):
    out, bpe_dir, _ = iwslt_sample
    check_binarized(out, bpe_dir, ["train", "valid", "test"], "de-en")
    assert text_lines(out / "dict.de.txt") == text_lines(out / "dict.en.txt")
    assert len(text_lines(out / "dict.en.txt")) > 100
    for split, n in {"train": 1000, "valid": 7283, "test": 6750}.items():
        for lang in ("de", "en"):
            assert len(text_lines(bpe_dir / f"{split}.{lang}")) == n, f"{split}.{lang}"


def test_iwslt_sample_bpe_is_fairseqs(iwslt_sample):
    """valid/test equal the staged fairseq BPE files; all splits round-trip to the tokenized text."""
    _, bpe_dir, _ = iwslt_sample
    src = DATA / "iwslt14-de-en"
    for split, stem in {"train": "train-sample", "valid": "valid", "test": "test"}.items():
        for lang in ("de", "en"):
            bpe = text_lines(bpe_dir / f"{split}.{lang}")
            assert [unbpe(x) for x in bpe] == xz_lines(src / f"{stem}.{lang}.xz")[:len(bpe)], f"{split}.{lang}"
            if split != "train":
                assert bpe == xz_lines(src / "bpe10k" / f"{stem}.{lang}.xz"), f"{split}.{lang}"


# --------------------------------------------------------------------------- IWSLT14 full recipe
def test_iwslt_full_recipe_plumbing_and_test_set_matches_fairseq(tmp_path):
    """prepare-full.sh on a local de-en.tgz: the real IWSLT14 XML test files plus a small
    stand-in train.tags file (the staged cased test text behind the real TED header tags).
    The test set it builds must be byte-identical to fairseq's (the staged test.{de,en})."""
    need_staged("iwslt14-de-en/raw/xml/IWSLT14.TED.dev2010.de-en.de.xml.xz", "iwslt14-de-en/raw/test.de.xz")
    src = DATA / "iwslt14-de-en"
    tgz = tmp_path / "de-en.tgz"
    n_text = 460  # 20 valid lines (every 23rd)
    with tarfile.open(tgz, "w:gz") as tar:
        def add(name, text):
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"de-en/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for xml in sorted((src / "raw" / "xml").glob("IWSLT14.*.xml.xz")):
            add(xml.name[:-3], lzma.open(xml, "rt", encoding="utf-8", newline="\n").read())
        for lang in ("de", "en"):
            header = ["<url>http://www.ted.com/talks/x.html</url>", "<keywords>talks</keywords>",
                      "<talkid>1</talkid>", f"<title>A Talk {lang}</title>",
                      f"<description>About it {lang}</description>"]
            add(f"train.tags.de-en.{lang}", "\n".join(header + xz_lines(src / "raw" / f"test.{lang}.xz")[:n_text]) + "\n")
    prep, out = tmp_path / "prep", tmp_path / "bin"
    proc, _ = run_script("examples/iwslt14_de_en/prepare-full.sh", prep, out,
                         env={"IWSLT14_TGZ": str(tgz), "JOBS": "1", "WORKERS": "1",
                              "SHARED_DATA_DIR": str(DATA)}, timeout=300)
    check_ok(proc)
    for lang in ("de", "en"):
        assert text_lines(prep / "tmp" / f"test.{lang}") == xz_lines(src / f"test.{lang}.xz"), f"test.{lang}"
        train = text_lines(prep / "tmp" / f"train.{lang}")
        valid = text_lines(prep / "tmp" / f"valid.{lang}")
        # title + description lines survive their tags; clean-corpus (ratio 1.5) drops a few pairs
        total = len(train) + len(valid)
        assert 0.95 * (n_text + 2) <= total <= n_text + 2
        assert len(valid) == total // 23
        assert not any(re.search(r"<(url|talkid|keywords|title|description)>", x) for x in train + valid)
        assert train[0] == f"a talk {lang}"  # tags stripped, lowercased
        for split in ("train", "valid", "test"):
            bpe = text_lines(prep / f"{split}.{lang}")
            assert [unbpe(x) for x in bpe] == text_lines(prep / "tmp" / f"{split}.{lang}")
    assert "tmp/test.de: identical to the staged fairseq output" in proc.stdout
    check_binarized(out, prep, ["train", "valid", "test"], "de-en", n_check=10)


def test_iwslt_full_recipe_fails_clearly_without_input(tmp_path):
    proc, _ = run_script("examples/iwslt14_de_en/prepare-full.sh", tmp_path / "prep", tmp_path / "bin",
                         env={"IWSLT14_TGZ": str(tmp_path / "nope.tgz")})
    assert proc.returncode != 0
    assert f"missing input file: {tmp_path / 'nope.tgz'}" in proc.stderr


# --------------------------------------------------------------------------- WMT14 test set
def test_wmt14_test_set_with_given_codes(tmp_path):
    need_staged("wmt14-en-fr/sgm/newstest2014-fren-src.en.sgm.xz", "wmt14-en-fr/train-sample.en.xz")
    # toy codes from the staged Europarl slice: only to exercise the script
    text = "\n".join(xz_lines(DATA / "wmt14-en-fr" / "train-sample.en.xz")[:300]
                     + xz_lines(DATA / "wmt14-en-fr" / "train-sample.fr.xz")[:300]) + "\n"
    codes = tmp_path / "code"
    with open(codes, "w") as f:
        subprocess.run([str(Path(sys.executable).parent / "subword-nmt"), "learn-bpe", "-s", "300"],
                       input=text, stdout=f, stderr=subprocess.DEVNULL, text=True, check=True)
    out = tmp_path / "wmt14_en_fr_test"
    proc, _ = run_script("examples/wmt14_en_fr/prepare-test.sh", codes, DATA, out)
    check_ok(proc)
    raw = {lang: xz_lines(DATA / "wmt14-en-fr" / f"test.{lang}.xz") for lang in ("en", "fr")}
    for lang in ("en", "fr"):
        tok = text_lines(out / "tok" / f"test.{lang}")
        bpe = text_lines(out / f"test.{lang}")
        assert len(tok) == len(bpe) == 3003
        assert [unbpe(x) for x in bpe] == tok
        assert any(" @-@ " in x for x in tok), "Moses -a (aggressive hyphen splitting) expected"
        # tokenization only inserts spaces (and XML escapes): same characters as sacrebleu's reference
        unescape = {"&amp;": "&", "&#124;": "|", "&lt;": "<", "&gt;": ">", "&apos;": "'", "&quot;": '"',
                    "&#91;": "[", "&#93;": "]", " @-@ ": "-"}
        same = 0
        for t, r in zip(tok, raw[lang]):
            for k, v in unescape.items():
                t = t.replace(k, v)
            same += t.replace(" ", "") == r.replace(" ", "").replace("’", "'")
        assert same >= 0.99 * len(tok)
    assert not (out / "bin").exists()


# --------------------------------------------------------------------------- moses_compat
def moses(*args, stdin):
    return subprocess.run([sys.executable, str(MOSES_COMPAT), *args], input=stdin.encode("utf-8"),
                          capture_output=True, check=True).stdout.decode("utf-8")


def test_tokenizer_matches_perl_rules():
    pytest.importorskip("sacremoses")
    # last word before the final "." is split even if it is a non-breaking prefix (tokenizer.perl)
    assert moses("tokenize", "-l", "de", stdin="Das ist usw.\n") == "Das ist usw .\n"
    assert moses("tokenize", "-l", "en", stdin="It's \"big\" & <b>\n") == "It &apos;s &quot; big &quot; &amp; &lt; b &gt;\n"
    # whitespace-only lines are passed through; "\r" is not a line break
    assert moses("tokenize", "-l", "en", stdin="a\r b\n  \nc\n") == "a b\n  \nc\n"
    assert moses("tokenize", "-a", "-l", "en", stdin="well-known\n") == "well @-@ known\n"


def test_lowercase_is_perl_lc():
    assert moses("lowercase", stdin="ÄBC ΟΔΟΣ\n") == "äbc οδοσ\n"  # no final-sigma rule


def test_clean_corpus_like_clean_corpus_n(tmp_path):
    de = ["a b c", "", "x", "one two three four five six", "ok  fine ", "w"]
    en = ["a b", "y", "", "1", " ok fine", "w"]
    (tmp_path / "c.de").write_text("\n".join(de) + "\n")
    (tmp_path / "c.en").write_text("\n".join(en) + "\n")
    subprocess.run([sys.executable, str(MOSES_COMPAT), "clean-corpus", "--ratio", "1.5",
                    str(tmp_path / "c"), "de", "en", str(tmp_path / "o"), "1", "5"],
                   check=True, capture_output=True)
    # "a b c"/"a b": ratio 1.5 is kept (only > 1.5 drops); empty sides, ratio 6, > 5 tokens dropped
    assert (tmp_path / "o.de").read_text() == "a b c\nok fine\nw\n"
    assert (tmp_path / "o.en").read_text() == "a b\nok fine\nw\n"
