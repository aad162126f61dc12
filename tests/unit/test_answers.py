"""Answers from hits: the asked cell with its unit, the answering sentence, sources once, declines."""

from __future__ import annotations

from typing import Any

from tablerag.answers import NOT_FOUND, dedupe, respond
from tablerag.documents import Table
from tablerag.store import Hit

POPULATION = Table(
    ["시도", "인구(만 명) 2022년", "인구(만 명) 2023년", "면적(km²)"],
    [["서울특별시", "943", "940", "605"], ["부산광역시", "332", "329", "771"]],
    "표 3. 시도별 인구와 면적",
)


def hit(kind: str, text: str, *, row: dict[str, str] | None = None, table: Table | None = None, **extra: Any) -> Hit:
    return Hit(
        chunk_id=extra.pop("chunk_id", 1),
        score=1.0,
        kind=kind,
        text=text,
        path=extra.pop("path", "/docs/a.html"),
        location={},
        row=row,
        table_caption=table.caption if table else None,
        table_markdown=table.markdown() if table else None,
        **extra,
    )


def seoul() -> Hit:
    row = dict(zip(POPULATION.header, POPULATION.rows[0], strict=True))
    return hit("row", "시도별 인구\n" + ", ".join(f"{h}: {v}" for h, v in row.items()), row=row, table=POPULATION)


def test_a_row_hit_answers_with_the_asked_cell_its_unit_row_and_column() -> None:
    reply = respond("서울특별시 2023년 인구는?", [seoul()])
    first, row = reply.text.split("\n")
    assert first == "940 (만 명) — 서울특별시, 인구(만 명) 2023년 [1]" and not reply.declined
    assert "인구(만 명) 2023년: 940" in row  # then the whole row
    area = respond("서울특별시 면적은 얼마나 되나요?", [seoul()]).text.split("\n")[0]
    assert area.startswith("605 (km²) — 서울특별시, 면적(km²)")


def test_the_cell_follows_what_the_question_asks_for() -> None:
    fees = Table(["프로그램", "월 이용료(원)", "정원(명)", "운영 시간"], [["수영", "52,000", "40", "06:00~21:00"]])
    row = dict(zip(fees.header, fees.rows[0], strict=True))
    swim = hit("row", "수영", row=row, table=fees)
    assert respond("수영 한 달 배우려면 얼마 내야 하나요?", [swim]).text.startswith("52,000 (원)")
    assert respond("수영 정원 몇 명임?", [swim]).text.startswith("40 (명)")
    assert respond("수영은 언제 하나요?", [swim]).text.startswith("06:00~21:00 — 수영, 운영 시간")
    people = {"행정동": "중앙동", "인구(명) 남": "8,000", "인구(명) 여": "8,200", "인구(명) 계": "16,200"}
    merged = hit("row", "중앙동", row=people)
    assert respond("중앙동 여자 인구는?", [merged]).text.startswith("8,200 (명) — 중앙동, 인구(명) 여")


def test_a_passage_answers_with_the_sentence_that_answers_not_the_first() -> None:
    text = (
        "가온시 여비 규정 | (2024. 3. 1. 개정)\n"
        "제1조(목적) 이 규정은 가온시 여비 지급에 필요한 사항을 정한다. "
        "제2조(출장 신청) 출장 5일 전까지 신청서를 제출하여야 한다. "
        "제3조(일비) 국내 출장의 일비는 25,000원으로 한다."
    )
    passage = hit("text", text)
    assert (
        respond("가온시 여비 규정의 일비는 얼마인가요?", [passage]).text
        == "제3조(일비) 국내 출장의 일비는 25,000원으로 한다. [1]"
    )
    assert respond("가온시 규정상 출장 신청은 언제까지?", [passage]).text.startswith("제2조(출장 신청)")


def test_sources_name_each_table_once_and_weak_evidence_is_declined() -> None:
    busan_row = dict(zip(POPULATION.header, POPULATION.rows[1], strict=True))
    busan = hit("row", "부산", row=busan_row, table=POPULATION, chunk_id=2)
    other = hit("text", "doc\n부산의 인구는 줄었다.", chunk_id=3, path="/docs/b.txt")
    unique = dedupe([seoul(), busan, other, seoul()])
    assert [h.chunk_id for h in unique] == [1, 3]  # the second row of the same table is not a second source
    weak = seoul()
    weak.evidence = 0.2
    reply = respond("대구광역시 인구는?", [weak])
    assert reply.declined and reply.text == NOT_FOUND and reply.hits == [weak]
    assert respond("anything", []).declined


def test_a_row_that_holds_no_column_the_question_asks_for_is_declined() -> None:
    fees = Table(["프로그램", "월 이용료(원)", "정원(명)", "운영 시간"], [["수영", "52,000", "40", "06:00~21:00"]])
    swim = hit("row", "수영", row=dict(zip(fees.header, fees.rows[0], strict=True)), table=fees)
    reply = respond("수영 강사의 이름은 무엇인가요?", [swim])  # the row of 수영, but no column of teachers
    assert reply.declined and reply.text == NOT_FOUND
    assert not respond("수영 정원 몇 명임?", [swim]).declined  # a column by the kind of value
    assert not respond("수영 운영 시간 알려줘", [swim]).declined  # a column by a word of its header
    assert not respond("수영은?", [swim]).declined  # asks nothing the row lacks: the whole row
    pairs = Table(["항목", "내용"], [["신청 방법", "온라인 접수"]])
    how = hit("row", "신청 방법", row=dict(zip(pairs.header, pairs.rows[0], strict=True)), table=pairs)
    assert not respond("신청 방법 안내해 주세요", [how]).declined  # one value: the label is what is asked


def test_a_passage_that_holds_the_question_only_in_its_context_lines_is_declined() -> None:
    text = (
        "가온시 여비 규정 | (2024. 3. 1. 개정)\n"
        "제2조(출장 신청) 출장 5일 전까지 신청서를 제출하여야 한다. "
        "제3조(정산) 출장을 마친 사람은 7일 이내에 여비를 정산하여야 한다."
    )
    passage = hit("text", text)
    reply = respond("가온시 규정에서 육아휴직은 몇 년까지 쓸 수 있나요?", [passage])  # 가온시, 규정: the context line
    assert reply.declined and reply.text == NOT_FOUND
    assert respond("가온시 규정상 여비는 며칠 안에 정산하나요?", [passage]).text.startswith("제3조(정산)")
    assert respond("가온시 규정상 출장 신천은 언제까지?", [passage]).text.startswith("제2조")  # a mistyped syllable


def test_common_nouns_shaped_like_places_are_not_names() -> None:
    from tablerag.chunking import names

    assert names("2022년 가온시 대야동의 가구 수는?") == {"가온시", "대야동"}  # 가구: households
    assert names("나래시 해안동 2023년 총인구 알려줘") == {"나래시", "해안동"}
    assert names("당시 활동 인원") == set()
    assert names("남구 배출 요일") == {"남구"}  # a district the dictionary knows
    assert names("푸른솔시 인구") == {"푸른솔시"}  # one it does not


def test_households_are_asked_as_가구_or_세대() -> None:
    people = Table(["행정동", "인구(명) 계", "세대수"], [["대야동", "35,635", "16,765"]])
    row = hit("row", "대야동", row=dict(zip(people.header, people.rows[0], strict=True)), table=people)
    reply = respond("대야동의 가구 수는?", [row])
    assert not reply.declined and reply.text.startswith("16,765")
