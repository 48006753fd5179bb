"""Instruction data from real dictionaries in Debian packages: "define this term", one domain each.

Three domains, each read from its Debian package (``apt-get install dict-foldoc dict-jargon
wordnet-base``):

- ``computing``: FOLDOC, the Free On-line Dictionary of Computing (``dict-foldoc``, GNU FDL 1.1+), dictd
  format in ``/usr/share/dictd/foldoc.{index,dict.dz}``;
- ``jargon``: the Jargon File, hacker slang (``dict-jargon``, public domain), dictd format in
  ``/usr/share/dictd/jargon.{index,dict.dz}``;
- ``general``: WordNet 3.0 nouns, general English (``wordnet-base``, WordNet 3.0 licence), database
  format in ``/usr/share/wordnet/data.noun``.

A dictd ``.index`` line is ``headword TAB offset TAB length`` with offset and length in dictd's
base64 digits (``A-Za-z0-9+/``, most significant first); they address the uncompressed text of the
``.dict.dz`` file, which is gzip-compatible. Each entry becomes one record
``{"instruction", "output", "domain", "term"}``: the instruction asks for the meaning of the term in
its domain, the output is the entry's first sentences (markup removed, at most `max_chars`).

Determinism and no leaks: a term (lower-cased, whitespace collapsed) goes to train, validation or
test by the SHA-256 of its text alone, so the same term from two dictionaries lands in the same
split and no output is ever in two splits; records with the same term and domain, or the same
definition, are kept once. The multiple-choice set is built from the test split only: for each test
record, the right definition and three distractors drawn (seeded by the term's hash) from other test
definitions of the same domain, the answer's position drawn too.

The sample committed under ``silotune/data/dictionaries_sample`` ("dictionaries-sample") is exactly
``build_sample()``, that is ``SAMPLE_CALL``; ``silotune data dictionaries --sample --out DIR``
writes it again.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from silotune.errors import DataError

logger = logging.getLogger(__name__)

DICTD_ROOT = Path("/usr/share/dictd")
WORDNET_ROOT = Path("/usr/share/wordnet")
SAMPLE_DIR = Path(__file__).parent / "dictionaries_sample"
MC_FILE = "multiple_choice.jsonl"
SPLITS = ("train", "validation", "test")
LETTERS = "ABCD"


@dataclass(frozen=True)
class Domain:
    """One dictionary: where it is, which Debian package installs it and its licence."""

    name: str
    package: str
    source: str
    license: str


DOMAINS = {
    "computing": Domain("computing", "dict-foldoc", "FOLDOC (dictd foldoc)", "GFDL-1.1+"),
    "jargon": Domain("jargon", "dict-jargon", "The Jargon File 4.4.7 (dictd jargon)", "public"),
    "general": Domain("general", "wordnet-base", "WordNet 3.0 nouns (data.noun)", "WordNet"),
}
DESCRIBED = {"computing": "computing", "jargon": "hacker slang", "general": "general English"}

SAMPLE_PER_DOMAIN = (100, 20, 20)  # train, validation, test records per domain
SAMPLE_MAX_CHARS = 200
SAMPLE_SEED = 0
SAMPLE_CALL = (
    "build_dictionary_splits(dictd_root, wordnet_root, seed=0, max_chars=200, "
    "per_domain=(100, 20, 20))"
)

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_number(text: str) -> int:
    """Decode a dictd index number (base64 digits, most significant first)."""
    value = 0
    for char in text:
        digit = _B64.find(char)
        if digit < 0:
            raise DataError(f"'{text}' is not a dictd base64 number")
        value = value * 64 + digit
    return value


def read_dictd(index: Path, dictionary: Path) -> list[tuple[str, str]]:
    """``(headword, entry text)`` of every entry of a dictd dictionary, in index order.

    Entries whose headword starts with ``00-database`` (dictd's own metadata) are skipped.
    """
    for path in (index, dictionary):
        if not path.is_file():
            raise DataError(f"dictionary file {path} does not exist")
    data = gzip.decompress(dictionary.read_bytes())
    entries = []
    for number, line in enumerate(index.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split("\t")
        if len(parts) != 3:
            raise DataError(f"{index} line {number}: expected 'headword TAB offset TAB length'")
        head, offset, length = parts[0], dictd_number(parts[1]), dictd_number(parts[2])
        if head.startswith("00-database") or head.startswith("00database"):
            continue
        raw = data[offset : offset + length]
        entries.append((head, raw.decode("utf-8", errors="replace")))
    return entries


def _clean(text: str) -> str:
    """Collapse whitespace; drop {cross-reference} braces and the URLs inside them."""
    text = re.sub(r"\{([^{}]*?)\s*\(\w+://[^)]*\)\}", r"\1", text)
    text = text.replace("{", "").replace("}", "")
    return " ".join(text.split())


def _first_sentences(text: str, max_chars: int) -> str:
    """Whole sentences from the start of `text`, as many as fit in `max_chars` (at least one)."""
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z\"(])", text)
    kept = ""
    for sentence in sentences:
        candidate = f"{kept} {sentence}".strip()
        if kept and len(candidate) > max_chars:
            break
        kept = candidate
    return kept


def _body_paragraphs(entry: str) -> list[str]:
    """The indented paragraphs of a dictd entry (its header lines, the headword forms, dropped)."""
    paragraphs = re.split(r"\n\s*\n", entry.strip("\n"))
    body = [p for p in paragraphs[1:] if p.strip()]
    return [_clean(p) for p in body]


def foldoc_definition(entry: str) -> str | None:
    """The definition in a FOLDOC entry: first paragraph, ``<category>`` tag and dates removed."""
    for paragraph in _body_paragraphs(entry):
        paragraph = re.sub(r"^<[^>]*>\s*", "", paragraph)
        if re.fullmatch(r"\(\d{4}-\d{2}-\d{2}\)", paragraph) or paragraph.startswith("See "):
            return None
        return paragraph or None
    return None


def jargon_definition(entry: str) -> str | None:
    """The definition in a Jargon File entry: first sense, ``[usage]`` tags and etymology removed."""
    for paragraph in _body_paragraphs(entry):
        for _ in range(2):  # "[tag] 1. text" and "1. [tag] text"
            paragraph = re.sub(r"^(\[[^\]]*\]\s*)+", "", paragraph)
            paragraph = re.sub(r"^1\.\s+", "", paragraph)
        if not paragraph or paragraph.startswith(("See ", "Syn.", "Var.", "Abbrev.")):
            continue
        return paragraph
    return None


def read_wordnet_nouns(root: Path) -> list[tuple[str, str]]:
    """``(term, gloss definition)`` of the first synset of each WordNet noun, in file order.

    Only lower-case terms of letters, spaces and hyphens (no proper names); the gloss is cut
    before its examples (``; "...``).
    """
    path = root / "data.noun"
    if not path.is_file():
        raise DataError(f"WordNet file {path} does not exist")
    entries = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  ") or " | " not in line:
            continue  # licence header
        fields, gloss = line.split(" | ", 1)
        words = fields.split()
        term = words[4].replace("_", " ")
        if not re.fullmatch(r"[a-z][a-z -]*[a-z]", term):
            continue
        definition = gloss.split('; "', 1)[0].strip().rstrip(";").strip()
        entries.append((term, definition))
    return entries


def _key(term: str) -> str:
    return " ".join(term.lower().split())


def _bucket(term: str, seed: int) -> float:
    """A number in [0, 1) fixed by the term and seed alone (so a term has one split)."""
    digest = hashlib.sha256(f"{seed}:{_key(term)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def make_record(term: str, definition: str, domain: str) -> dict[str, str]:
    """One instruction record asking for `term`'s meaning in `domain`."""
    return {
        "instruction": f'What does "{term}" mean in {DESCRIBED[domain]}? Answer in one or two '
        "sentences.",
        "output": definition,
        "domain": domain,
        "term": term,
    }


def read_domains(
    dictd_root: Path, wordnet_root: Path, max_chars: int
) -> dict[str, list[tuple[str, str]]]:
    """``domain -> [(term, definition)]`` read from the three dictionaries, cleaned and capped."""
    foldoc = read_dictd(dictd_root / "foldoc.index", dictd_root / "foldoc.dict.dz")
    jargon = read_dictd(dictd_root / "jargon.index", dictd_root / "jargon.dict.dz")
    raw = {
        "computing": [(h, foldoc_definition(e)) for h, e in foldoc],
        "jargon": [(h, jargon_definition(e)) for h, e in jargon],
        "general": list(read_wordnet_nouns(wordnet_root)),
    }
    domains: dict[str, list[tuple[str, str]]] = {}
    for name, pairs in raw.items():
        kept = []
        for term, definition in pairs:
            if not definition:
                continue
            text = _first_sentences(definition, max_chars)
            if 20 <= len(text) <= max_chars and 2 <= len(term) <= 40:
                kept.append((" ".join(term.split()), text))
        domains[name] = kept
    return domains


def _split_of(bucket: float, fractions: Sequence[float]) -> str:
    if bucket < fractions[0]:
        return "train"
    return "validation" if bucket < fractions[0] + fractions[1] else "test"


def build_dictionary_splits(
    dictd_root: Path = DICTD_ROOT,
    wordnet_root: Path = WORDNET_ROOT,
    seed: int = 0,
    max_chars: int = 300,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    per_domain: Sequence[int] | None = None,
) -> dict[str, list[dict[str, str]]]:
    """Build train/validation/test instruction records and the multiple-choice set.

    Parameters
    ----------
    dictd_root, wordnet_root : Path
        Where ``dict-foldoc``/``dict-jargon`` and ``wordnet-base`` put their files.
    seed : int
        Seed of the split assignment, the order of records and the multiple-choice draws.
    max_chars : int
        Definitions are cut to whole sentences within this many characters; longer first
        sentences are dropped.
    fractions : sequence of float
        (train, validation, test) share of the terms.
    per_domain : (int, int, int) or None
        Keep at most this many records per domain in train, validation, test (the ones with the
        smallest hash, so a smaller sample is a subset of a larger one); None = all.

    Returns
    -------
    dict[str, list[dict[str, str]]]
        ``train``, ``validation``, ``test`` records (``instruction, output, domain, term``) and
        ``multiple_choice`` records (``question, choices, answer, domain, term``).
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise DataError(f"fractions must be three shares summing to 1, got {tuple(fractions)}")
    domains = read_domains(dictd_root, wordnet_root, max_chars)
    splits: dict[str, list[dict[str, str]]] = {name: [] for name in SPLITS}
    seen_definitions: set[str] = set()
    for name in sorted(domains):
        seen_terms: set[str] = set()
        by_split: dict[str, list[tuple[float, dict[str, str]]]] = {s: [] for s in SPLITS}
        for term, definition in domains[name]:
            key, text_key = _key(term), _key(definition)
            if key in seen_terms or text_key in seen_definitions:
                continue
            seen_terms.add(key)
            seen_definitions.add(text_key)
            bucket = _bucket(term, seed)
            by_split[_split_of(bucket, fractions)].append(
                (bucket, make_record(term, definition, name))
            )
        for position, split in enumerate(SPLITS):
            ranked = [record for _, record in sorted(by_split[split], key=lambda p: p[0])]
            if per_domain is not None:
                ranked = ranked[: per_domain[position]]
            splits[split].extend(ranked)
        logger.info(
            "dictionaries: %s -> %s",
            name,
            ", ".join(f"{s} {len(by_split[s])}" for s in SPLITS),
        )
    rng = random.Random(seed)
    for split in SPLITS:
        rng.shuffle(splits[split])
    result: dict[str, list] = dict(splits)
    result["multiple_choice"] = multiple_choice(splits["test"], seed)
    return result


def multiple_choice(records: Sequence[Mapping[str, str]], seed: int) -> list[dict]:
    """Four-way "which definition" questions, distractors from the same domain's records."""
    by_domain: dict[str, list[Mapping[str, str]]] = {}
    for record in records:
        by_domain.setdefault(record["domain"], []).append(record)
    questions = []
    for record in records:
        pool = sorted(
            r["output"] for r in by_domain[record["domain"]] if r["output"] != record["output"]
        )
        if len(pool) < 3:
            continue
        rng = random.Random(f"{seed}:{_key(record['term'])}:{record['domain']}")
        choices = rng.sample(pool, 3)
        answer = rng.randrange(4)
        choices.insert(answer, record["output"])
        questions.append(
            {
                "question": f'Which is the meaning of "{record["term"]}" in '
                f"{DESCRIBED[record['domain']]}?",
                "choices": choices,
                "answer": LETTERS[answer],
                "domain": record["domain"],
                "term": record["term"],
            }
        )
    return questions


def write_dataset(
    splits: Mapping[str, Sequence[Mapping]],
    out_dir: Path,
    overwrite: bool,
    provenance: Mapping[str, object] | None = None,
) -> Path:
    """Write ``<split>.jsonl``, ``multiple_choice.jsonl`` and ``meta.json`` (counts per domain).

    `provenance` (name, builder call, seed, ...) goes into ``meta.json`` before the counts.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"Output path {out_dir} exists and is not a folder.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(
            f"Output folder {out_dir} is not empty; choose another or pass --overwrite."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    for name, records in splits.items():
        filename = MC_FILE if name == "multiple_choice" else f"{name}.jsonl"
        lines = [json.dumps(dict(r), ensure_ascii=False) + "\n" for r in records]
        (out_dir / filename).write_text("".join(lines), encoding="utf-8")
        per: dict[str, int] = {}
        for record in records:
            per[record["domain"]] = per.get(record["domain"], 0) + 1
        counts[name] = dict(sorted(per.items()))
    meta = {
        **dict(provenance or {"name": out_dir.name}),
        "task": "instruction",
        "domains": {
            d.name: {"package": d.package, "source": d.source, "license": d.license}
            for d in DOMAINS.values()
        },
        "counts": counts,
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out_dir


def build_sample(
    dictd_root: Path = DICTD_ROOT, wordnet_root: Path = WORDNET_ROOT
) -> dict[str, list[dict[str, str]]]:
    """Rebuild the committed "dictionaries-sample" exactly (the call is `SAMPLE_CALL`)."""
    return build_dictionary_splits(
        dictd_root,
        wordnet_root,
        seed=SAMPLE_SEED,
        max_chars=SAMPLE_MAX_CHARS,
        per_domain=SAMPLE_PER_DOMAIN,
    )


def sample_provenance() -> dict[str, object]:
    """What the committed sample's ``meta.json`` says about how it was built."""
    return {
        "name": "dictionaries-sample",
        "seed": SAMPLE_SEED,
        "builder": f"silotune.data.dictionaries.{SAMPLE_CALL}",
        "rebuild": "silotune data dictionaries --sample --out DIR",
    }


def packages_missing(dictd_root: Path = DICTD_ROOT, wordnet_root: Path = WORDNET_ROOT) -> list[str]:
    """Debian packages whose files are absent (for a clear error and for test skips)."""
    missing = []
    if not (dictd_root / "foldoc.index").is_file():
        missing.append("dict-foldoc")
    if not (dictd_root / "jargon.index").is_file():
        missing.append("dict-jargon")
    if not (wordnet_root / "data.noun").is_file():
        missing.append("wordnet-base")
    return missing
