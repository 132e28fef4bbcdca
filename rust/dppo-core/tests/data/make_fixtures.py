"""Generate the tokenizer fixtures used by the dppo-core tokenizer tests.

Writes `bpe_qwen2.json` next to this script: a small byte-level BPE trained
with the Python `tokenizers` package on a deterministic synthetic corpus, set
up like Qwen2 (NFC normalizer, Qwen2 split regex + ByteLevel without regex,
ChatML special tokens after the vocabulary). The Rust tests derive the other
variants (GPT-2 ByteLevel regex, cl100k regex, ignore_merges, legacy merge
strings, extra added tokens, unsupported configurations) by editing this JSON.

Usage: python3 make_fixtures.py   (needs `pip install tokenizers`)
"""

import json
import pathlib
import random

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

WORDS = """the of and to in is was that for it with as his on be at by this had not are but
from or have an they which one you were her all she there would their we him been has when
who will more no if out so said what up its about into than them can only other new some
could time these two may then do first any my now such like our over man me even most made
after also did many before must through back years where much your way well down should
because each just those people how too little state good very make world still own see men
work long get here between both life being under never day same another know while last might
us great old year off come since against go came right used take three tokenizer tokenization
byte pair encoding merge vocabulary Python Rust function return value string list dictionary
Don't I'm you're he'll she'd we've they're it's THAT'S WE'LL I'D YOU'VE""".split()

UNICODE = [
    "café", "cafe\u0301", "naïve", "nai\u0308ve", "résumé", "über", "Straße", "smörgåsbord",
    "中文", "字符", "你好世界", "日本語", "テキスト", "한국어", "가나다",
    "😀", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "🚀🚀",
    "مرحبا", "٠١٢٣٤٥", "שלום", "हिन्दी", "Ελληνικά", "Русский", "ſ",
    "\u00a0", "\u3000", "½", "²", "Ⅻ", "１２３",
]

PUNCT = [".", ",", "!", "?", "...", ":", ";", "(", ")", "\"", "'", "-", "--", "```", "#", "$", "%", "@"]
SPACES = [" ", " ", " ", " ", "  ", "\n", "\n\n", "\r\n", "\t", "    "]


SYLLABLES = [c + v for c in "bcdfghklmnprstvwzBKST" for v in ["a", "e", "i", "o", "u", "é", "ou", "ai"]]
SYLLABLES += ["中", "文", "字", "語", "ка", "ни", "ра", "λο", "γο", "ال", "كت"]


def pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))


def corpus(seed: int = 1234, n: int = 8000):
    rng = random.Random(seed)
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(5, 40)):
            r = rng.random()
            if r < 0.45:
                parts.append(rng.choice(WORDS))
            elif r < 0.65:
                parts.append(pseudo_word(rng))
            elif r < 0.75:
                parts.append(rng.choice(UNICODE))
            elif r < 0.85:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 6))))
            else:
                parts.append(rng.choice(PUNCT))
            parts.append(rng.choice(SPACES))
        yield "".join(parts)


def main() -> None:
    out_dir = pathlib.Path(__file__).resolve().parent
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=3000,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    # Re-serialize through json to get a stable, sorted-key-free layout.
    data = json.loads(tok.to_str())
    (out_dir / "bpe_qwen2.json").write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    print("vocab", tok.get_vocab_size(), "->", out_dir / "bpe_qwen2.json")


if __name__ == "__main__":
    main()
