"""Train the byte-level BPE tokenizer of the `tiny-llama` preset from Debian's fortunes corpus.

Run once by a maintainer (needs `apt-get install fortunes`); the result is committed as
src/silotune/models/assets/tiny_tokenizer.json so nobody else needs the corpus or a download:

    python scripts/build_tiny_tokenizer.py
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path("/usr/share/games/fortunes")
OUT = Path(__file__).resolve().parents[1] / "src/silotune/models/assets/tiny_tokenizer.json"
SPECIAL = ["<|endoftext|>", "<|pad|>"]


def corpus() -> list[str]:
    texts = []
    for path in sorted(ROOT.iterdir()):
        if path.is_dir() or path.suffix in {".dat", ".u8"}:
            continue
        raw = path.read_text(encoding="utf-8", errors="replace")
        texts += [t.strip() for t in raw.split("\n%\n") if t.strip()]
    return texts


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(OUT))


if __name__ == "__main__":
    main()
