"""A split folder: its index, its shards (checked to exist) and its tokenizer.

A split is what `calmrl data build` writes per train/val/test: shards, an
`index.json` with counts per shard and per missing pattern, layouts for
local seeking, and (one folder up) the tokenizer of the captions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline.contract import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.shards import read_index
from data_pipeline.storage import is_remote, join, list_names, read_bytes
from data_pipeline.tokenizer import load_tokenizer, minilm_tokenizer_json


@dataclass(frozen=True)
class SplitInfo:
    root: str
    shards: list[str]
    counts: list[int]
    num_samples: int
    tokenizer_json: str
    index: dict[str, Any]

    @property
    def count_of(self) -> dict[str, int]:
        return dict(zip(self.shards, self.counts))

    @property
    def layout_of(self) -> dict[str, str]:
        """Shard URL -> its layout's URL, for the shards built with one."""
        return {
            join(self.root, s["name"]): join(self.root, s["layout"]) for s in self.index["shards"] if s.get("layout")
        }


def open_split(split_dir: str | Path, tokenizer: str = "") -> SplitInfo:
    """Read a split's index, check that every shard it lists exists, load its tokenizer.

    `tokenizer` (data.tokenizer) replaces the split's own: "minilm" for the
    pretrained MiniLM text tower, or the path of a tokenizer.json."""
    root = str(split_dir)
    index = read_index(root)
    names = [s["name"] for s in index["shards"]]
    present = list_names(root)
    for name in names:
        if name not in present:
            raise DataError(
                f"shard {join(root, name)} listed in {join(root, 'index.json')} is missing; "
                "rebuild the split or restore the shard"
            )
    tokenizer_rel = index.get("tokenizer", "tokenizer.json")
    if is_remote(root):
        tokenizer_url = (
            join(root.rsplit("/", 1)[0], Path(tokenizer_rel).name)
            if tokenizer_rel.startswith("../")
            else join(root, tokenizer_rel)
        )
    else:
        tokenizer_url = str((Path(root) / tokenizer_rel).resolve())
    if tokenizer == "minilm":
        tokenizer_json = minilm_tokenizer_json()
    else:
        tokenizer_json = read_bytes(tokenizer or tokenizer_url).decode()
    return SplitInfo(
        root,
        [join(root, n) for n in names],
        [int(s["count"]) for s in index["shards"]],
        int(index["num_samples"]),
        tokenizer_json,
        index,
    )


def vocab_size(cfg: DataConfig) -> int:
    """Size of the vocabulary the text tower embeds: that of `cfg.shards`' tokenizer
    (or of `cfg.tokenizer` when it replaces the split's)."""
    split = open_split(cfg.shards, cfg.tokenizer)
    return int(load_tokenizer(split.tokenizer_json, cfg.max_text_len).get_vocab_size())
