"""A sample corpus of Korean documents with tables, one per supported format, and questions.

The figures are sample data made up for testing (fees, rules, statistics), not official
ones. ``write_corpus(folder)`` writes the files; ``QUESTIONS`` pairs each question with
the file and the strings that the answering chunk contains.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tablerag.documents import Table

FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/nanum/NanumGothic.ttf",
    "/usr/share/fonts/truetype/nanum/NanumBarunGothic.ttf",
)

TUITION = [
    ["계열", "입학금", "수업료", "합계"],
    ["인문사회", "0", "3,450,000", "3,450,000"],
    ["자연과학", "0", "4,020,000", "4,020,000"],
    ["공학", "0", "4,610,000", "4,610,000"],
    ["예체능", "0", "4,890,000", "4,890,000"],
    ["의학", "0", "6,120,000", "6,120,000"],
]
SCHOLARSHIPS = [
    ["장학금", "지급액", "선발 기준"],
    ["성적우수", "수업료 전액", "직전 학기 평점 4.3 이상"],
    ["근로", "월 60만 원", "교내 부서 근무 주 10시간"],
    ["가계곤란", "200만 원", "소득 3분위 이하"],
    ["봉사", "100만 원", "학기 중 봉사 40시간 이상"],
]
LOANS = [
    ["이용자 구분", "대출 권수", "대출 기간", "연장 횟수"],
    ["학부생", "10권", "14일", "1회"],
    ["대학원생", "20권", "30일", "2회"],
    ["교직원", "30권", "60일", "2회"],
    ["졸업생", "3권", "7일", "0회"],
]
LATE_FEES = [
    ["연체 기간", "연체료(1권 1일당)"],
    ["1~10일", "100원"],
    ["11~30일", "200원"],
    ["31일 이상", "300원 및 대출 정지"],
]
POPULATION = [  # 시도, 2021, 2022, 2023 (만 명), 면적 (km²)
    ["서울특별시", "951", "943", "940", "605"],
    ["부산광역시", "335", "332", "329", "771"],
    ["대구광역시", "238", "236", "237", "1,499"],
    ["인천광역시", "295", "297", "300", "1,067"],
    ["광주광역시", "144", "143", "142", "501"],
    ["대전광역시", "145", "145", "144", "540"],
    ["제주특별자치도", "68", "68", "68", "1,850"],
]
PARKING = [
    ["차종", "기본요금(30분)", "추가요금(10분당)", "1일 최대"],
    ["경차", "500원", "200원", "5,000원"],
    ["승용차", "1,000원", "400원", "10,000원"],
    ["승합차", "1,500원", "600원", "15,000원"],
    ["화물차", "2,000원", "800원", "20,000원"],
]
ELECTRICITY = [
    ["구간", "월 사용량(kWh)", "기본요금(원/호)", "전력량요금(원/kWh)"],
    ["1단계", "200 이하", "910", "120.0"],
    ["2단계", "201~400", "1,600", "214.6"],
    ["3단계", "400 초과", "7,300", "307.3"],
]
BUDGET = [
    ["부서", "예산", "집행액", "집행률"],
    ["총무과", "1,200", "980", "81.7%"],
    ["교육지원과", "3,400", "3,050", "89.7%"],
    ["시설관리과", "2,750", "1,930", "70.2%"],
    ["정보화담당관", "1,580", "1,420", "89.9%"],
]
STAFF = [  # 부서, 정원, 현원
    ["총무과", "12", "11"],
    ["교육지원과", "25", "23"],
    ["시설관리과", "18", "18"],
    ["정보화담당관", "9", "7"],
]
CIVIL_RULES = """민원 처리 규정

제1조(목적) 이 규정은 시민이 제기한 민원을 신속하고 공정하게 처리하기 위하여 필요한 사항을 정함을 목적으로 한다.

제2조(처리 기간) 일반 민원은 접수한 날부터 7일 이내에 처리하여야 한다. 다만, 현장 조사가 필요한 민원은 14일 이내에 처리할 수 있다.

제3조(수수료) 각종 증명서의 발급 수수료는 1통당 500원으로 한다. 다만, 인터넷으로 발급하는 경우에는 수수료를 면제한다.

제4조(처리 결과 통지) 민원을 처리한 때에는 그 결과를 문서, 전자우편 또는 문자메시지로 민원인에게 지체 없이 통지하여야 한다.

제5조(반복 민원) 같은 내용의 민원을 정당한 사유 없이 3회 이상 반복하여 제출한 경우에는 이후 접수된 민원을 종결 처리할 수 있다.

제6조(개인정보 보호) 민원 처리 담당자는 민원 처리 과정에서 알게 된 민원인의 개인정보를 민원 처리 목적 외의 용도로 사용하여서는 아니 된다.
"""


@dataclass(frozen=True)
class Question:
    question: str
    file: str
    contains: tuple[str, ...]  # every string the answering chunk holds
    answer: str = ""  # the value an answer must contain ("" when none is expected)
    kind: str = "direct"  # what makes it hard (``tablerag.collection.KINDS``)


def _q(question: str, file: str, *contains: str) -> Question:
    return Question(question, file, contains)


PDF, DOCX, HTML, MD, CSV, XLSX, TXT = (
    "대학_등록금_안내.pdf",
    "도서관_이용규정.docx",
    "시도별_인구.html",
    "공영주차장_요금.md",
    "주택용_전기요금.csv",
    "예산_현황.xlsx",
    "민원처리_규정.txt",
)

QUESTIONS: list[Question] = [
    _q("공학 계열의 수업료는 얼마인가요?", PDF, "공학", "4,610,000"),
    _q("의학 계열 등록금 합계는?", PDF, "의학", "6,120,000"),
    _q("인문사회 계열 수업료 알려줘", PDF, "인문사회", "3,450,000"),
    _q("예체능 계열 등록금은 얼마야?", PDF, "예체능", "4,890,000"),
    _q("자연과학 계열의 수업료", PDF, "자연과학", "4,020,000"),
    _q("성적우수 장학금을 받으려면 평점이 얼마나 되어야 하나요?", PDF, "성적우수", "4.3"),
    _q("근로 장학금 지급액은?", PDF, "근로", "60만"),
    _q("가계곤란 장학금 선발 기준은 무엇인가요?", PDF, "가계곤란", "3분위"),
    _q("봉사 장학금은 봉사를 몇 시간 해야 받을 수 있나요?", PDF, "봉사", "40시간"),
    _q("등록금 납부 기간은 언제인가요?", PDF, "납부 기간"),
    _q("대학원생은 책을 몇 권까지 빌릴 수 있나요?", DOCX, "대학원생", "20권"),
    _q("학부생 대출 기간은 며칠인가요?", DOCX, "학부생", "14일"),
    _q("교직원의 대출 연장 횟수는?", DOCX, "교직원", "60일"),
    _q("졸업생도 책을 빌릴 수 있나요? 몇 권인가요?", DOCX, "졸업생", "3권"),
    _q("연체 31일 이상이면 연체료가 얼마인가요?", DOCX, "31일 이상", "300원"),
    _q("11일에서 30일 연체했을 때 하루 연체료는?", DOCX, "11~30일", "200원"),
    _q("도서관 자료를 분실하면 어떻게 해야 하나요?", DOCX, "분실"),
    _q("도서관 개관 시간은 어떻게 되나요?", DOCX, "개관"),
    _q("서울특별시 2023년 인구는?", HTML, "서울특별시", "940"),
    _q("부산광역시의 2021년 인구는 몇 만 명인가요?", HTML, "부산광역시", "335"),
    _q("대구광역시 면적은 얼마인가요?", HTML, "대구광역시", "1,499"),
    _q("인천광역시 2022년 인구", HTML, "인천광역시", "297"),
    _q("제주특별자치도 면적은?", HTML, "제주특별자치도", "1,850"),
    _q("광주광역시의 2023년 인구는 몇 명인가요?", HTML, "광주광역시", "142"),
    _q("대전광역시 인구는 2021년에 얼마였나요?", HTML, "대전광역시", "145"),
    _q("승용차 기본 주차 요금은 얼마인가요?", MD, "승용차", "1,000원"),
    _q("경차 1일 최대 주차 요금은?", MD, "경차", "5,000원"),
    _q("화물차는 10분마다 추가 요금이 얼마인가요?", MD, "화물차", "800원"),
    _q("승합차 하루 최대 요금", MD, "승합차", "15,000원"),
    _q("장애인 차량은 주차 요금을 얼마나 감면받나요?", MD, "장애인", "50%"),
    _q("주차장 운영 시간은?", MD, "운영 시간"),
    _q("월 사용량 200kWh 이하 구간의 기본요금은?", CSV, "1단계", "910"),
    _q("2단계 전력량 요금은 kWh당 얼마인가요?", CSV, "2단계", "214.6"),
    _q("400kWh를 넘게 쓰면 기본요금이 얼마인가요?", CSV, "3단계", "7,300"),
    _q("시설관리과 예산 집행률은?", XLSX, "시설관리과", "70.2%"),
    _q("교육지원과의 2024년 예산은 얼마인가요?", XLSX, "교육지원과", "3,400"),
    _q("총무과 집행액", XLSX, "총무과", "980"),
    _q("정보화담당관 현원은 몇 명인가요?", XLSX, "정보화담당관", "현원: 7"),
    _q("교육지원과 정원은?", XLSX, "교육지원과", "정원: 25"),
    _q("민원은 며칠 안에 처리해야 하나요?", TXT, "7일 이내"),
    _q("증명서 발급 수수료는 얼마인가요?", TXT, "500원"),
    _q("같은 민원을 여러 번 제출하면 어떻게 되나요?", TXT, "3회 이상"),
    _q("민원 처리 결과는 어떻게 통지하나요?", TXT, "통지"),
    _q("민원인의 개인정보를 다른 용도로 써도 되나요?", TXT, "개인정보"),
]


def korean_font() -> str:
    for path in FONT_CANDIDATES:
        if Path(path).is_file():
            return path
    found = (
        shutil.which("fc-match")
        and subprocess.run(
            ["fc-match", "-f", "%{file}", ":lang=ko"], capture_output=True, text=True, check=False
        ).stdout
    )
    if found and found.endswith(".ttf") and Path(found).is_file():
        return found
    raise RuntimeError("no Korean TrueType font found for the sample PDF: install Debian's fonts-nanum")


def write_corpus(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    writers = [_pdf, _docx, _html, _markdown, _csv, _xlsx, _txt]
    return [writer(folder) for writer in writers]


def write_questions(path: Path) -> None:
    """The questions as JSON, the format ``rag_with_tables.py evaluate --questions`` reads."""
    items = [{"question": q.question, "file": q.file, "contains": list(q.contains)} for q in QUESTIONS]
    path.write_text(json.dumps(items, ensure_ascii=False, indent=1), encoding="utf-8")


def _pdf(folder: Path) -> Path:
    from fpdf import FPDF

    logging.getLogger("fontTools").setLevel(logging.ERROR)  # subsetting notes on every run
    pdf = FPDF(format="A4")
    pdf.add_font("Nanum", "", korean_font())
    pdf.add_font("Nanum", "B", korean_font())
    pdf.set_font("Nanum", size=11)
    pdf.set_auto_page_break(True, margin=20)
    pdf.add_page()
    width = pdf.w - pdf.l_margin - pdf.r_margin

    def para(text: str) -> None:
        pdf.multi_cell(width, 7, text, new_x="LMARGIN", new_y="NEXT")
        pdf.ln(4)

    para("1. 2025학년도 등록금")
    para(
        "2025학년도 1학기 등록금은 계열별로 다음과 같다. 입학금은 모든 계열에서 받지 않으며, "
        "수업료는 전년도와 같은 수준으로 동결하였다."
    )
    para("표 1. 계열별 등록금 (단위: 원)")
    with pdf.table(text_align="CENTER", line_height=8) as table:
        for row in TUITION:
            cells = table.row()
            for value in row:
                cells.cell(value)
    pdf.ln(6)
    para("2. 장학금")
    para("재학생은 다음 장학금을 신청할 수 있다. 장학금은 학기마다 선발하며 중복하여 받을 수 없다.")
    para("표 2. 장학금 종류")
    columns = (pdf.l_margin, pdf.l_margin + 40, pdf.l_margin + 85)
    for row in SCHOLARSHIPS:  # a table without ruling lines
        y = pdf.get_y()
        for x, value in zip(columns, row, strict=True):
            pdf.set_xy(x, y)
            pdf.cell(45, 8, value)
        pdf.set_xy(pdf.l_margin, y + 8)
    pdf.ln(8)
    pdf.add_page()
    para("3. 납부 기간")
    para(
        "등록금 납부 기간은 2025년 2월 17일부터 2월 21일까지이다. 납부 기간에 내지 못한 학생은 "
        "추가 납부 기간인 3월 4일까지 낼 수 있으며, 그 뒤에는 미등록으로 제적될 수 있다."
    )
    para("분할 납부를 원하는 학생은 납부 기간 시작 전까지 학생지원팀에 신청하여 4회까지 나누어 낼 수 있다.")
    path = folder / PDF
    pdf.output(str(path))
    return path


def _docx(folder: Path) -> Path:
    import docx
    from docx.oxml import OxmlElement
    from docx.oxml.ns import qn

    document = docx.Document()
    document.add_heading("도서관 이용 규정", level=0)
    document.add_heading("제1장 총칙", level=1)
    document.add_paragraph("제1조(목적) 이 규정은 도서관 자료의 이용과 대출에 필요한 사항을 정함을 목적으로 한다.")
    document.add_paragraph(
        "제2조(개관 시간) 도서관의 개관 시간은 평일 오전 9시부터 오후 10시까지, 토요일은 오전 9시부터 "
        "오후 5시까지로 한다. 일요일과 공휴일은 휴관한다."
    )
    document.add_heading("제2장 대출", level=1)
    document.add_paragraph("제3조(대출 한도) 이용자별 대출 권수와 기간은 다음 표와 같다.")
    document.add_paragraph("표 2. 이용자별 대출 한도")
    for rows in (LOANS, LATE_FEES):
        if rows is LATE_FEES:
            document.add_paragraph("제4조(연체료) 반납 기한을 넘긴 자료에는 다음의 연체료를 부과한다.")
            document.add_paragraph("표 3. 연체료")
        table = document.add_table(rows=len(rows), cols=len(rows[0]))
        table.style = "Table Grid"
        for r, row in enumerate(rows):
            for c, value in enumerate(row):
                table.cell(r, c).text = value
        header = table.rows[0]._tr.get_or_add_trPr()
        marker = OxmlElement("w:tblHeader")
        marker.set(qn("w:val"), "true")
        header.append(marker)
    document.add_paragraph(
        "제5조(분실 및 훼손) 대출한 자료를 분실하거나 훼손한 이용자는 같은 자료로 변상하여야 하며, "
        "같은 자료를 구할 수 없는 경우에는 정가의 두 배를 현금으로 변상한다."
    )
    path = folder / DOCX
    document.save(str(path))
    return path


def _html(folder: Path) -> Path:
    rows = "\n".join(
        "<tr><th>" + r[0] + "</th>" + "".join(f"<td>{v}</td>" for v in r[1:]) + "</tr>" for r in POPULATION
    )
    html = f"""<!doctype html>
<html lang="ko"><head><meta charset="utf-8"><title>시도별 인구</title></head>
<body>
<h1>시도별 인구 및 면적</h1>
<p>아래 표는 주요 시도의 연말 기준 주민등록 인구와 면적을 정리한 것이다. 인구는 만 명 단위로 반올림하였다.</p>
<table border="1">
<caption>표 3. 시도별 인구와 면적</caption>
<thead>
<tr><th rowspan="2">시도</th><th colspan="3">인구(만 명)</th><th rowspan="2">면적(km²)</th></tr>
<tr><th>2021년</th><th>2022년</th><th>2023년</th></tr>
</thead>
<tbody>
{rows}
</tbody>
</table>
<h2>참고</h2>
<p>대구광역시의 면적은 2023년 7월 군위군 편입 이후의 면적이다.</p>
</body></html>
"""
    path = folder / HTML
    path.write_text(html, encoding="utf-8")
    return path


def _markdown(folder: Path) -> Path:
    table = Table(PARKING[0], PARKING[1:]).markdown()
    text = f"""# 공영주차장 요금 안내

시에서 운영하는 공영주차장의 요금과 감면 기준을 안내합니다. 운영 시간은 매일 오전 7시부터 오후 11시까지이며, 운영 시간 외에는 무료입니다.

## 요금표

표 4. 차종별 주차 요금

{table}

## 감면

장애인 차량과 국가유공자 차량은 주차 요금의 50%를 감면합니다. 전기차와 수소차 같은 친환경 차량은 30%를 감면하며, 감면은 중복하여 적용하지 않습니다.
"""
    path = folder / MD
    path.write_text(text, encoding="utf-8")
    return path


def _csv(folder: Path) -> Path:
    path = folder / CSV
    with open(path, "w", encoding="utf-8-sig", newline="") as fh:
        csv.writer(fh).writerows(ELECTRICITY)
    return path


def _xlsx(folder: Path) -> Path:
    import openpyxl

    workbook = openpyxl.Workbook()
    budget = workbook.active
    budget.title = "2024 예산"
    budget.append(["2024년 부서별 예산 집행 현황 (단위: 백만 원)"])
    budget.merge_cells(start_row=1, start_column=1, end_row=1, end_column=4)
    for row in BUDGET:
        budget.append(row)
    staff = workbook.create_sheet("인력 현황")
    staff.append(["부서", "인원", None])
    staff.append([None, "정원", "현원"])
    staff.merge_cells("A1:A2")
    staff.merge_cells("B1:C1")
    for name, quota, current in STAFF:
        staff.append([name, int(quota), int(current)])
    path = folder / XLSX
    workbook.save(str(path))
    return path


def _txt(folder: Path) -> Path:
    path = folder / TXT
    path.write_text(CIVIL_RULES, encoding="utf-8")
    return path
