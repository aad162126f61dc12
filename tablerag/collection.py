"""An evaluation collection shaped like real office files, and its labelled questions.

Families of look-alike documents: three sports centres x two years with the same table,
four hospitals' hours, two cities' population statistics with a sheet per year and a
merged group header, two organisations' budgets (a sheet per year), two organisations'
travel rules in two versions, two years of a library list whose ruled PDF table runs onto
a second page without its header, two universities' tuition, two cities' parking fees,
two years of electricity tariffs and three districts' waste-collection guides, with
footers and source lines around the tables. 29 files in the seven formats.

Each question carries the file and strings of the passage that answers it, the value an
answer must contain, and its kind (``KINDS``); unanswerable questions have no file. The
figures are made up; ``write_collection(folder)`` writes it all, deterministically.
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tablerag.documents import Table
from tablerag.samples import Question, korean_font

KINDS = (
    "distractor",
    "paraphrase",
    "informal",
    "typo",
    "multi-sheet",
    "merged-header",
    "across-pages",
    "prose",
    "unanswerable",
)

Writer = Callable[[Path], Path]

# --- the data -------------------------------------------------------------------------------

CENTRES = [
    ("한빛체육센터", "동구 시설관리공단"),
    ("푸른솔체육센터", "서구 시설관리공단"),
    ("누리체육센터", "남구 시설관리공단"),
]
CENTRE_YEARS = (2023, 2024)
PROGRAMS = ["수영", "헬스", "요가", "필라테스", "탁구", "배드민턴"]
PROGRAM_FEE = [52000, 38000, 45000, 61000, 27000, 31000]
PROGRAM_SEATS = [40, 30, 25, 15, 20, 24]
HOURS = ["06:00~21:00", "06:00~22:00", "09:00~18:00", "10:00~20:00", "13:00~21:00", "07:00~20:00", "08:00~19:00"]
CLOSED = ["둘째 주 월요일", "넷째 주 화요일", "첫째 주 수요일", "셋째 주 목요일"]
CENTRE_HEADER = ["프로그램", "월 이용료(원)", "정원(명)", "운영 시간"]


def centre_table(c: int, year: int) -> list[list[str]]:
    y = year - 2023
    rows = []
    for p, name in enumerate(PROGRAMS):
        fee = PROGRAM_FEE[p] + (0, 1500, 3200)[c] + 2400 * y
        seats = PROGRAM_SEATS[p] + 5 * c + 2 * y
        rows.append([name, f"{fee:,}", str(seats), HOURS[(p + 2 * c + y) % len(HOURS)]])
    return rows


def centre_closed(c: int, year: int) -> str:
    return CLOSED[(c + (year - 2023) * (c == 0) * 3) % len(CLOSED)]


def centre_parking(c: int, year: int) -> str:
    return f"{1 + c + (year - 2023) * (c == 1)}시간"


HOSPITALS = ["시립중앙병원", "시립동부병원", "시립서부병원", "시립북부병원"]
DEPARTMENTS = ["내과", "외과", "소아청소년과", "정형외과", "이비인후과", "피부과", "안과"]
HOSPITAL_HEADER = ["진료과", "평일 진료 시간", "토요일 진료 시간", "점심시간"]
STARTS = ["08:30", "09:00", "09:30"]
ENDS = ["17:00", "17:30", "18:00", "18:30"]
SATURDAY = ["09:00~12:30", "휴진", "09:00~13:00", "08:30~12:00", "09:30~13:30"]
LUNCH = ["12:30~13:30", "13:00~14:00", "12:00~13:00"]


def hospital_table(h: int) -> list[list[str]]:
    return [
        [
            name,
            f"{STARTS[(h + d) % 3]}~{ENDS[(2 * h + d) % 4]}",
            SATURDAY[(h * 2 + d) % 5],
            LUNCH[(h + 2 * d) % 3],
        ]
        for d, name in enumerate(DEPARTMENTS)
    ]


CITIES = {
    "가온시": ["중앙동", "신흥동", "월산동", "행복동", "대야동"],
    "나래시": ["중앙동", "송정동", "해안동", "석남동", "대야동"],
}
POPULATION_YEARS = (2021, 2022, 2023)


def population_rows(city: int, year: int) -> list[list[str]]:
    rows = []
    for d, dong in enumerate(list(CITIES.values())[city]):
        men = 8000 + 2311 * d + 977 * city + 131 * (year - 2021) + 17 * d * d
        women = men + 200 + 53 * d - 71 * (year - 2021) + 29 * city
        homes = (men + women) // 2 - 1200 + 37 * d
        rows.append([dong, f"{men:,}", f"{women:,}", f"{men + women:,}", f"{homes:,}"])
    return rows


ORGS = ["한국문화재단", "미래산업진흥원"]
BUDGET_ITEMS = [
    ["공연 지원", "지역 축제", "국제 교류", "교육 사업"],
    ["창업 지원", "기술 개발", "수출 상담", "인력 양성"],
]


def budget_rows(org: int, year: int) -> list[list[str]]:
    rows = []
    for i, item in enumerate(BUDGET_ITEMS[org]):
        plan = 1200 + 730 * i + 410 * org + 95 * (year - 2023)
        spent = plan * (70 + 7 * i + 3 * (year - 2023) + org) // 100
        rows.append([item, f"{plan:,}", f"{spent:,}", f"{100 * spent / plan:.1f}%"])
    return rows


RULE_VERSIONS = (2022, 2024)
GRADES = ["1급", "2급", "3급 이하"]


def rule_terms(org: int, version: int) -> dict[str, str]:
    v = version == 2024
    return {
        "apply": ["3일 전", "5일 전"][(org + v) % 2],
        "daily": ["20,000원", "25,000원", "30,000원"][org + v],
        "settle": ["5일 이내", "7일 이내", "10일 이내"][org + v],
        "seat": ["일반석", "일반석", "비즈니스석"][org + v],
        "hours": ["4시간", "5시간", "6시간"][org + v],
    }


def lodging_rows(org: int, version: int) -> list[list[str]]:
    v = version == 2024
    rows = []
    for g, grade in enumerate(GRADES):
        base = 100_000 - 15_000 * g + 5_000 * org + 10_000 * v
        rows.append([grade, f"{base:,}", f"{base - 20_000:,}", f"{base - 30_000:,}"])
    return rows


LIBRARY_NAMES = [
    "중앙", "별빛", "햇살", "솔숲", "물빛", "구름", "바람", "달빛", "새봄", "들꽃",
    "하늘", "꿈나무", "푸른길", "한울", "너른들", "은하수", "느티", "소나무", "가람", "다솜",
    "미리내", "바다", "산들", "온누리", "초록", "한마음", "해오름", "노을", "무지개", "샛별",
    "여울", "이슬", "자람", "큰숲", "파랑새", "행복",
]  # fmt: skip
LIBRARY_TOWNS = ["중앙동", "신흥동", "월산동", "행복동", "대야동", "송정동"]
LIBRARY_YEARS = (2023, 2024)
LIBRARY_HEADER = ["도서관명", "소재지", "장서 수(권)", "연간 이용자(명)", "열람석(석)"]


def library_rows(year: int) -> list[list[str]]:
    y = year - 2023
    rows = []
    for i, name in enumerate(LIBRARY_NAMES):
        books = 48_000 + 3_917 * i + 2_311 * y + (i * i * 13) % 977
        visitors = 61_000 + 5_113 * i - 3_407 * y + (i * 7919) % 4_001
        rows.append([f"가온{name}도서관", LIBRARY_TOWNS[i % 6], f"{books:,}", f"{visitors:,}", str(80 + 7 * i + 4 * y)])
    return rows


UNIVERSITIES = ["가온대학교", "나래대학교"]
FIELDS = ["인문사회", "자연과학", "공학", "예체능", "의학"]


def tuition_rows(u: int) -> list[list[str]]:
    rows = []
    for f, name in enumerate(FIELDS):
        fee = 3_450_000 + 571_000 * f + 123_000 * u + (f * f * 17_000)
        entrance = "0" if u == 0 else "180,000"
        total = fee + (0 if u == 0 else 180_000)
        rows.append([name, entrance, f"{fee:,}", f"{total:,}"])
    return rows


PARKING_CITIES = ["가온시", "나래시"]
VEHICLES = ["경차", "승용차", "승합차", "화물차"]


def parking_rows(c: int) -> list[list[str]]:
    rows = []
    for v, name in enumerate(VEHICLES):
        base = 500 + 500 * v + 100 * c
        rows.append([name, f"{base:,}원", f"{200 + 200 * v + 50 * c:,}원", f"{base * 10 + 1000 * c:,}원"])
    return rows


TARIFF_YEARS = (2023, 2024)


def tariff_rows(year: int) -> list[list[str]]:
    y = year - 2023
    return [
        ["1단계", "200 이하", f"{910 + 20 * y:,}", f"{120.0 + 5.3 * y:.1f}"],
        ["2단계", "201~400", f"{1600 + 60 * y:,}", f"{214.6 + 8.9 * y:.1f}"],
        ["3단계", "400 초과", f"{7300 + 240 * y:,}", f"{307.3 + 12.4 * y:.1f}"],
    ]


DISTRICTS = ["동구", "서구", "남구"]


def waste_terms(d: int) -> dict[str, str]:
    return {
        "days": ["월요일, 수요일, 금요일", "화요일, 목요일, 토요일", "일요일, 화요일, 목요일"][d],
        "time": ["오후 8시부터 자정까지", "오후 7시부터 오후 11시까지", "오후 6시부터 오후 10시까지"][d],
        "food": ["1리터 납부필증 130원", "1리터 납부필증 150원", "1리터 납부필증 120원"][d],
        "bulky": ["장롱 1개 8,000원", "장롱 1개 10,000원", "장롱 1개 9,000원"][d],
        "phone": ["051-440-4411", "051-240-4522", "051-607-4633"][d],
    }


# --- the files ------------------------------------------------------------------------------


def write_collection(folder: Path) -> list[Path]:
    """Write every file of the collection to ``folder``: the same content each run (DOCX and XLSX files
    also record when they were written)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [writer(folder) for writer in writers()]


def writers() -> list[Writer]:
    out: list[Writer] = []
    for c in range(len(CENTRES)):
        for year in CENTRE_YEARS:
            out.append(_centre_writer(c, year))
    for h in range(len(HOSPITALS)):
        out.append(_hospital_writer(h))
    out += [_population_writer(c) for c in range(len(CITIES))]
    out += [_budget_writer(o) for o in range(len(ORGS))]
    out += [_rules_writer(o, v) for o in range(len(ORGS)) for v in RULE_VERSIONS]
    out += [_library_writer(y) for y in LIBRARY_YEARS]
    out += [_tuition_writer(u) for u in range(len(UNIVERSITIES))]
    out += [_parking_writer(c) for c in range(len(PARKING_CITIES))]
    out += [_tariff_writer(y) for y in TARIFF_YEARS]
    out += [_waste_writer(d) for d in range(len(DISTRICTS))]
    return out


def centre_file(c: int, year: int) -> str:
    return f"{CENTRES[c][0]}_{year}년_운영현황." + ("docx", "html", "md")[c]


def _centre_writer(c: int, year: int) -> Writer:
    name, org = CENTRES[c]
    title = f"{name} {year}년 프로그램 운영 현황"
    intro = (
        f"{year}년 {name}에서 운영하는 프로그램의 월 이용료와 정원, 운영 시간은 다음과 같다. "
        "이용료는 성인 1인 기준이며 부가가치세를 포함한다."
    )
    caption = "표 1. 프로그램별 월 이용료와 정원"
    source = f"자료: {org} 체육사업팀 ({year}. 1. 2. 기준)"
    notes = (
        f"정기 휴관일은 매월 {centre_closed(c, year)}이며, 설과 추석 연휴에도 휴관한다. "
        f"센터 이용자의 주차는 {centre_parking(c, year)}까지 무료이며, 그 뒤에는 10분마다 300원을 받는다."
    )
    rows = [CENTRE_HEADER, *centre_table(c, year)]

    def write(folder: Path) -> Path:
        path = folder / centre_file(c, year)
        if c == 0:
            import docx

            document = docx.Document()
            document.add_heading(title, level=0)
            document.add_paragraph(f"{org} | 발행일 {year}. 1. 5.")
            document.add_heading("1. 프로그램 현황", level=1)
            document.add_paragraph(intro)
            document.add_paragraph(caption)
            _docx_table(document, rows)
            document.add_paragraph(source)
            document.add_heading("2. 이용 안내", level=1)
            document.add_paragraph(notes)
            document.save(str(path))
        elif c == 1:
            body = _html_rows(rows)
            path.write_text(
                f"<!doctype html><html lang='ko'><head><meta charset='utf-8'><title>{title}</title></head><body>\n"
                f"<header><p>{org} 홈페이지 &gt; 알림마당 &gt; 운영 현황</p></header>\n"
                f"<h1>{title}</h1>\n<h2>프로그램 현황</h2>\n<p>{intro}</p>\n"
                f"<table border='1'><caption>{caption}</caption>\n{body}</table>\n<p>{source}</p>\n"
                f"<h2>이용 안내</h2>\n<p>{notes}</p>\n"
                f"<footer><p>Copyright {org}. All rights reserved.</p></footer></body></html>\n",
                encoding="utf-8",
            )
        else:
            md = Table(rows[0], rows[1:]).markdown()
            path.write_text(
                f"# {title}\n\n{org}\n\n## 프로그램 현황\n\n{intro}\n\n{md}\n\n{source}\n\n## 이용 안내\n\n{notes}\n",
                encoding="utf-8",
            )
        return path

    return write


def hospital_file(h: int) -> str:
    return f"{HOSPITALS[h]}_진료시간." + ("csv", "csv", "html", "html")[h]


def _hospital_writer(h: int) -> Writer:
    rows = [HOSPITAL_HEADER, *hospital_table(h)]

    def write(folder: Path) -> Path:
        path = folder / hospital_file(h)
        if h < 2:
            with open(path, "w", encoding="utf-8-sig", newline="") as fh:
                csv.writer(fh).writerows(rows)
        else:
            name = HOSPITALS[h]
            path.write_text(
                f"<!doctype html><html lang='ko'><head><meta charset='utf-8'><title>{name} 진료 안내</title></head>"
                f"<body>\n<h1>{name} 진료과별 진료 시간</h1>\n"
                "<p>진료 시간은 접수 마감 시간이 아니며, 접수는 진료 종료 30분 전에 마감한다.</p>\n"
                f"<table border='1'>\n{_html_rows(rows)}</table>\n"
                f"<p>※ 공휴일은 휴진합니다. 문의: {name} 원무과</p>\n</body></html>\n",
                encoding="utf-8",
            )
        return path

    return write


def population_file(city: int) -> str:
    return f"{list(CITIES)[city]}_행정동별_인구통계.xlsx"


def _population_writer(city: int) -> Writer:
    name = list(CITIES)[city]

    def write(folder: Path) -> Path:
        import openpyxl

        workbook = openpyxl.Workbook()
        workbook.remove(workbook.active)
        for year in POPULATION_YEARS:
            sheet = workbook.create_sheet(f"{year}년")
            sheet.append([f"{name} {year}년 행정동별 인구 (단위: 명, 세대)"])
            sheet.merge_cells(start_row=1, start_column=1, end_row=1, end_column=5)
            sheet.append(["행정동", "인구(명)", None, None, "세대수"])
            sheet.append([None, "남", "여", "계", None])
            sheet.merge_cells("A2:A3")
            sheet.merge_cells("B2:D2")
            sheet.merge_cells("E2:E3")
            for row in population_rows(city, year):
                sheet.append(row)
            sheet.append([f"자료: {name} 민원지적과 주민등록 인구통계 ({year}. 12. 31. 기준)"])
        path = folder / population_file(city)
        workbook.save(str(path))
        return path

    return write


def budget_file(org: int) -> str:
    return f"{ORGS[org]}_사업별_예산.xlsx"


def _budget_writer(org: int) -> Writer:
    def write(folder: Path) -> Path:
        import openpyxl

        workbook = openpyxl.Workbook()
        workbook.remove(workbook.active)
        for year in (2023, 2024):
            sheet = workbook.create_sheet(f"{year}년 예산")
            sheet.append([f"{ORGS[org]} {year}년 사업별 예산 집행 현황 (단위: 백만 원)"])
            sheet.merge_cells(start_row=1, start_column=1, end_row=1, end_column=4)
            sheet.append(["사업명", "예산", "집행액", "집행률"])
            for row in budget_rows(org, year):
                sheet.append(row)
        path = folder / budget_file(org)
        workbook.save(str(path))
        return path

    return write


def rules_file(org: int, version: int) -> str:
    return f"{ORGS[org]}_여비규정_{version}." + ("txt", "docx")[org]


def rule_articles(org: int, version: int) -> list[str]:
    t = rule_terms(org, version)
    return [
        f"제1조(목적) 이 규정은 {ORGS[org]} 임직원의 국내외 출장에 드는 여비의 지급에 필요한 사항을 "
        "정함을 목적으로 한다.",
        f"제2조(출장 신청) 출장하려는 직원은 출장 {t['apply']}까지 소속 부서장에게 출장 신청서를 제출하여야 한다. "
        "다만, 긴급한 경우에는 출장 후에 제출할 수 있다.",
        f"제3조(일비) 국내 출장의 일비는 {t['daily']}으로 한다. 공용 차량을 이용한 경우에는 일비의 2분의 1을 감액한다.",
        f"제4조(여비 정산) 출장자는 출장을 마친 날부터 {t['settle']}에 영수증을 첨부하여 여비를 정산하여야 한다.",
        f"제5조(항공 좌석) 비행시간이 {t['hours']} 이상인 국외 출장의 항공 좌석은 {t['seat']}으로 한다.",
    ]


def _rules_writer(org: int, version: int) -> Writer:
    title = f"{ORGS[org]} 여비 규정"
    stamp = f"({version}. 3. 1. 개정)"
    lodging = "제6조(숙박비) 숙박비는 직급과 지역에 따라 다음 표의 금액을 상한으로 실비로 지급한다."

    def write(folder: Path) -> Path:
        path = folder / rules_file(org, version)
        articles = rule_articles(org, version)
        if org == 0:
            table = "\n".join(
                "  ".join(r) for r in [["직급", "서울", "광역시", "그 밖의 지역"], *lodging_rows(org, version)]
            )
            path.write_text(
                f"{title}\n{stamp}\n\n" + "\n\n".join(articles) + f"\n\n{lodging}\n\n{table}\n\n"
                f"부칙 이 규정은 {version}년 3월 1일부터 시행한다.\n\n- 1 -\n",
                encoding="utf-8",
            )
        else:
            import docx

            document = docx.Document()
            document.add_heading(title, level=0)
            document.add_paragraph(stamp)
            for article in articles:
                document.add_paragraph(article)
            document.add_paragraph(lodging)
            document.add_paragraph("표 1. 직급별 숙박비 상한 (단위: 원)")
            _docx_table(document, [["직급", "서울", "광역시", "그 밖의 지역"], *lodging_rows(org, version)])
            document.add_paragraph(f"부칙 이 규정은 {version}년 3월 1일부터 시행한다.")
            document.save(str(path))
        return path

    return write


def library_file(year: int) -> str:
    return f"가온시_공공도서관_현황_{year}.pdf"


def _pdf() -> Any:
    from fpdf import FPDF

    logging.getLogger("fontTools").setLevel(logging.ERROR)
    pdf = FPDF(format="A4")
    pdf.set_creation_date(datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC))  # the same bytes each run
    pdf.add_font("Nanum", "", korean_font())
    pdf.add_font("Nanum", "B", korean_font())
    pdf.set_font("Nanum", size=11)
    pdf.set_auto_page_break(True, margin=20)
    return pdf


def _library_writer(year: int) -> Writer:
    def write(folder: Path) -> Path:
        pdf = _pdf()
        pdf.add_page()
        width = pdf.w - pdf.l_margin - pdf.r_margin
        for text in (
            f"가온시 공공도서관 현황 ({year}년)",
            f"가온시 평생학습과에서 {year}년 12월 31일 기준으로 시내 공공도서관의 장서와 이용 현황을 조사하였다. "
            "연간 이용자는 출입 인원을 기준으로 한다.",
            f"표 1. 도서관별 장서 수와 연간 이용자 ({year}년)",
        ):
            pdf.multi_cell(width, 7, text, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(3)
        with pdf.table(text_align="CENTER", line_height=7, repeat_headings=0) as table:
            for row in [LIBRARY_HEADER, *library_rows(year)]:
                cells = table.row()
                for value in row:
                    cells.cell(value)
        pdf.ln(4)
        pdf.multi_cell(width, 7, "자료: 가온시 평생학습과 도서관운영팀", new_x="LMARGIN", new_y="NEXT")
        path = folder / library_file(year)
        pdf.output(str(path))
        return path

    return write


def tuition_file(u: int) -> str:
    return f"{UNIVERSITIES[u]}_2025학년도_등록금_안내.pdf"


def _tuition_writer(u: int) -> Writer:
    def write(folder: Path) -> Path:
        pdf = _pdf()
        pdf.add_page()
        width = pdf.w - pdf.l_margin - pdf.r_margin

        def para(text: str) -> None:
            pdf.multi_cell(width, 7, text, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(3)

        para(f"{UNIVERSITIES[u]} 2025학년도 1학기 등록금 안내")
        para("1. 계열별 등록금")
        para("2025학년도 1학기 등록금은 계열별로 다음과 같다. 수업료는 전년도와 같은 수준으로 동결하였다.")
        para("표 1. 계열별 등록금 (단위: 원)")
        with pdf.table(text_align="CENTER", line_height=8) as table:
            for row in [["계열", "입학금", "수업료", "합계"], *tuition_rows(u)]:
                cells = table.row()
                for value in row:
                    cells.cell(value)
        pdf.ln(6)
        para("2. 납부 기간")
        days = ["2월 17일부터 2월 21일까지", "2월 19일부터 2월 25일까지"][u]
        para(
            f"등록금 납부 기간은 2025년 {days}이다. "
            "분할 납부를 원하는 학생은 학생지원팀에 신청하여 4회까지 나누어 낼 수 있다."
        )
        para(f"{UNIVERSITIES[u]} 학생지원팀 | 개정일 2025. 1. 10.")
        path = folder / tuition_file(u)
        pdf.output(str(path))
        return path

    return write


def parking_file(c: int) -> str:
    return f"{PARKING_CITIES[c]}_공영주차장_요금.md"


def _parking_writer(c: int) -> Writer:
    def write(folder: Path) -> Path:
        city = PARKING_CITIES[c]
        rows = [["차종", "기본요금(30분)", "추가요금(10분당)", "1일 최대"], *parking_rows(c)]
        discount = ["50%", "60%"][c]
        path = folder / parking_file(c)
        path.write_text(
            f"# {city} 공영주차장 요금 안내\n\n"
            f"{city}에서 운영하는 공영주차장의 요금은 차종에 따라 다르며, 최초 30분의 기본요금과 그 뒤 10분마다의 "
            "추가요금, 하루 최대 요금은 아래와 같습니다.\n\n"
            f"{Table(rows[0], rows[1:]).markdown()}\n\n"
            f"## 감면\n\n장애인 차량과 국가유공자 차량은 주차 요금의 {discount}를 감면합니다. "
            "감면은 중복하여 적용하지 않습니다.\n\n"
            f"---\n최종 수정일: 2024-0{3 + c}-15 | {city} 교통행정과\n",
            encoding="utf-8",
        )
        return path

    return write


def tariff_file(year: int) -> str:
    return f"주택용_전기요금_{year}년.csv"


def _tariff_writer(year: int) -> Writer:
    def write(folder: Path) -> Path:
        path = folder / tariff_file(year)
        with open(path, "w", encoding="utf-8-sig", newline="") as fh:
            rows = [["구간", "월 사용량(kWh)", "기본요금(원/호)", "전력량요금(원/kWh)"], *tariff_rows(year)]
            csv.writer(fh).writerows(rows)
        return path

    return write


def waste_file(d: int) -> str:
    return f"{DISTRICTS[d]}_생활폐기물_배출안내.txt"


def _waste_writer(d: int) -> Writer:
    def write(folder: Path) -> Path:
        t = waste_terms(d)
        name = DISTRICTS[d]
        path = folder / waste_file(d)
        path.write_text(
            f"{name} 생활폐기물 배출 안내\n\n"
            f"일반 쓰레기는 종량제 봉투에 담아 {t['days']}에 배출합니다. 배출 시간은 {t['time']}이며, "
            "집 앞이나 지정된 장소에 내놓습니다.\n\n"
            f"음식물 쓰레기는 물기를 빼고 전용 용기에 담아 배출하며, 용기에는 {t['food']}을 붙입니다.\n\n"
            "재활용품은 종류별로 나누어 투명한 봉투에 담아 배출하며, 스티로폼은 테이프와 운송장을 떼고 내놓습니다.\n\n"
            "대형 폐기물은 인터넷이나 전화로 신고한 뒤 수수료를 내고 배출합니다. "
            f"수수료는 {t['bulky']} 등 품목별로 다릅니다.\n\n"
            f"문의: {name}청 청소행정과 (☎ {t['phone']})\n\n자료: {name}청 (2024. 5. 1. 기준)\n",
            encoding="utf-8",
        )
        return path

    return write


def _docx_table(document: Any, rows: list[list[str]]) -> None:
    from docx.oxml import OxmlElement
    from docx.oxml.ns import qn

    table = document.add_table(rows=len(rows), cols=len(rows[0]))
    table.style = "Table Grid"
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    marker = OxmlElement("w:tblHeader")
    marker.set(qn("w:val"), "true")
    table.rows[0]._tr.get_or_add_trPr().append(marker)


def _html_rows(rows: list[list[str]]) -> str:
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in rows[0]) + "</tr>\n"
    return head + "".join("<tr>" + "".join(f"<td>{v}</td>" for v in r) + "</tr>\n" for r in rows[1:])


# --- the questions --------------------------------------------------------------------------


def typo(text: str, rng: random.Random) -> str:
    """One syllable of one word (not a number, not the first word) with its final consonant
    added or dropped, as a slip of the keyboard: '이용료' -> '이용룐'."""
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if i > 0 and len(w) >= 2 and all("가" <= ch <= "힣" for ch in w[:2])]
    i = rng.choice(candidates)
    word = words[i]
    j = rng.randrange(min(len(word), 3))
    code = ord(word[j]) - 0xAC00
    if not 0 <= code < 11172:
        return text
    final = code % 28
    code = code - final + (0 if final else 4)
    words[i] = word[:j] + chr(0xAC00 + code) + word[j + 1 :]
    return " ".join(words)


def questions() -> list[Question]:
    rng = random.Random(15)
    out: list[Question] = []

    def add(kind: str, question: str, file: str, answer: str, *contains: str) -> None:
        out.append(Question(question, file, tuple(contains) or (answer,), answer=answer, kind=kind))

    for c, (name, _) in enumerate(CENTRES):
        for year in CENTRE_YEARS:
            f, rows = centre_file(c, year), centre_table(c, year)
            p0, p1, p2, p3 = (rows[(c + year + k) % 6] for k in (0, 1, 2, 3))
            add("distractor", f"{name} {year}년 {p0[0]} 월 이용료는 얼마인가요?", f, p0[1], p0[0], p0[1])
            add(
                "paraphrase",
                f"{year}년에 {name}에서 {p1[0]}를 한 달 배우려면 얼마를 내야 하나요?",
                f,
                p1[1],
                p1[0],
                p1[1],
            )
            add("informal", f"{name} {p2[0]} 정원 몇 명임? {year}년 거", f, p2[2], p2[0], p2[2])
            add("typo", typo(f"{name} {year}년 {p3[0]} 운영 시간은 언제인가요?", rng), f, p3[3], p3[0], p3[3])
            closed = centre_closed(c, year)
            add("prose", f"{year}년 {name}의 정기 휴관일은 언제인가요?", f, closed)
            add("informal", f"{name}에 차 가져가면 {year}년엔 주차 몇 시간 공짜야?", f, centre_parking(c, year))

    for h, name in enumerate(HOSPITALS):
        f, rows = hospital_file(h), hospital_table(h)
        r = [rows[(h + k) % len(rows)] for k in range(6)]
        short = name.removeprefix("시립")
        add("distractor", f"{name} {r[0][0]} 토요일 진료 시간은?", f, r[0][2], r[0][0], r[0][2])
        add("paraphrase", f"평일에 {name} {r[1][0]}는 몇 시부터 몇 시까지 진료하나요?", f, r[1][1], r[1][0], r[1][1])
        add("informal", f"{short} {r[2][0]} 점심시간 언제야?", f, r[2][3], r[2][0], r[2][3])
        add("typo", typo(f"{name} {r[3][0]} 평일 진료 시간 알려주세요", rng), f, r[3][1], r[3][0], r[3][1])
        add("paraphrase", f"주말에 {name} {r[4][0]}에 가면 몇 시에 진료를 보나요?", f, r[4][2], r[4][0], r[4][2])
        add("distractor", f"{name}의 {r[5][0]} 점심시간은 몇 시인가요?", f, r[5][3], r[5][0], r[5][3])

    for city, cname in enumerate(CITIES):
        f = population_file(city)
        for year in POPULATION_YEARS:
            rows = population_rows(city, year)
            a, b, c2, d = (rows[(year + k + city) % 5] for k in (0, 1, 2, 3))
            add("merged-header", f"{cname} {year}년 {a[0]} 여자 인구는?", f, a[2], a[0], a[2])
            add("multi-sheet", f"{year}년 {cname} {b[0]} 세대수는 얼마인가요?", f, b[4], b[0], b[4])
            add("informal", f"{year}년에 {cname} {c2[0]}에 사람 몇 명 살았어?", f, c2[3], c2[0], c2[3])
            add("merged-header", f"{cname} {d[0]}의 {year}년 남자 인구", f, d[1], d[0], d[1])

    for org, oname in enumerate(ORGS):
        f = budget_file(org)
        for year in (2023, 2024):
            rows = budget_rows(org, year)
            a, b = rows[(year + org) % 4], rows[(year + org + 2) % 4]
            add("multi-sheet", f"{oname} {year}년 {a[0]} 사업 예산은 얼마인가요?", f, a[1], a[0], a[1])
            add("multi-sheet", f"{year}년 {oname}의 {b[0]} 집행률은?", f, b[3], b[0], b[3])

    for org, oname in enumerate(ORGS):
        for version in RULE_VERSIONS:
            f, t = rules_file(org, version), rule_terms(org, version)
            when = f"{version}년 개정" if version == 2024 else f"{version}년"
            add("prose", f"{when} {oname} 여비 규정에서 출장 신청서는 언제까지 내야 하나요?", f, t["apply"])
            add("distractor", f"{oname} {when} 여비 규정의 국내 출장 일비는 얼마인가요?", f, t["daily"])
            add(
                "paraphrase",
                f"{oname}에서 출장 다녀온 뒤 여비는 며칠 안에 정산해야 하나요? ({version}년 규정)",
                f,
                t["settle"],
            )
            add("prose", f"{oname} {version}년 규정상 장거리 해외 출장 때 비행기 좌석 등급은?", f, t["seat"])
            grade = lodging_rows(org, version)[(org + version) % 3]
            add(
                "distractor",
                f"{oname} {version}년 여비 규정에서 {grade[0]} 직원의 서울 숙박비 상한은?",
                f,
                grade[1],
                grade[0],
                grade[1],
            )

    for year in LIBRARY_YEARS:
        f, rows = library_file(year), library_rows(year)
        late = [rows[i] for i in (27, 30, 33, 35)]  # on the second page
        early = [rows[i] for i in (3, 11, 19)]
        add("across-pages", f"{year}년 {late[0][0]} 장서 수는 몇 권인가요?", f, late[0][2], late[0][0], late[0][2])
        add("across-pages", f"{late[1][0]}의 {year}년 연간 이용자 수는?", f, late[1][3], late[1][0], late[1][3])
        add("across-pages", f"{year}년 {late[2][0]} 열람석은 몇 석이야?", f, late[2][4], late[2][0], late[2][4])
        add(
            "across-pages",
            typo(f"{year}년 {late[3][0]} 소재지는 어디인가요?", rng),
            f,
            late[3][1],
            late[3][0],
            late[3][1],
        )
        add("distractor", f"{early[0][0]} {year}년 장서 수", f, early[0][2], early[0][0], early[0][2])
        add(
            "paraphrase",
            f"{year}년에 {early[1][0]}를 찾은 사람은 1년 동안 몇 명이었나요?",
            f,
            early[1][3],
            early[1][0],
            early[1][3],
        )
        add("informal", f"{early[2][0]} 좌석 몇 개? {year}년", f, early[2][4], early[2][0], early[2][4])

    for u, uname in enumerate(UNIVERSITIES):
        f, rows = tuition_file(u), tuition_rows(u)
        add("distractor", f"{uname} {rows[2][0]} 계열 수업료는 얼마인가요?", f, rows[2][2], rows[2][0], rows[2][2])
        add(
            "paraphrase",
            f"{uname}에서 {rows[4 - u][0]} 계열 학생이 한 학기에 내는 돈은 모두 얼마인가요?",
            f,
            rows[4 - u][3],
        )
        days = ["2월 17일부터 2월 21일까지", "2월 19일부터 2월 25일까지"][u]
        add("prose", f"{uname} 등록금 납부 기간은 언제인가요?", f, days)

    for c, city in enumerate(PARKING_CITIES):
        f, rows = parking_file(c), parking_rows(c)
        add("distractor", f"{city} 공영주차장 {rows[1][0]} 기본요금은?", f, rows[1][1], rows[1][0], rows[1][1])
        add("informal", f"{city} 주차장 {rows[0][0]} 하루 최대 얼마?", f, rows[0][3], rows[0][0], rows[0][3])
        add("paraphrase", f"{city} 공영주차장에서 {rows[3][0]}는 10분 더 세우면 얼마가 추가되나요?", f, rows[3][2])
        add("typo", typo(f"{city} 공영주차장 {rows[2][0]} 1일 최대 요금은 얼마인가요?", rng), f, rows[2][3], rows[2][3])
        add("prose", f"{city}에서 장애인 차량은 공영주차장 요금을 얼마나 감면받나요?", f, ["50%", "60%"][c])

    for year in TARIFF_YEARS:
        f, rows = tariff_file(year), tariff_rows(year)
        add(
            "distractor",
            f"{year}년 주택용 전기요금 2단계 전력량요금은 kWh당 얼마인가요?",
            f,
            rows[1][3],
            "2단계",
            rows[1][3],
        )
        add("paraphrase", f"{year}년에 한 달 400kWh를 넘게 쓰는 집의 기본요금은?", f, rows[2][2], "3단계", rows[2][2])
        add("informal", f"{year}년 전기 200kWh 이하로 쓰면 기본요금 얼마임", f, rows[0][2], "1단계", rows[0][2])

    for d, name in enumerate(DISTRICTS):
        f, t = waste_file(d), waste_terms(d)
        add("prose", f"{name}에서 일반 쓰레기는 무슨 요일에 내놓나요?", f, t["days"])
        add("prose", f"{name} 쓰레기 배출 시간은 몇 시부터 몇 시까지인가요?", f, t["time"])
        add("informal", f"{name} 대형 폐기물 장롱 버리는 데 얼마 들어?", f, t["bulky"].split(" ")[-1])

    for question in UNANSWERABLE:
        out.append(Question(question, "", (), answer="", kind="unanswerable"))
    return out


UNANSWERABLE = [
    "새빛체육센터 2024년 수영 월 이용료는 얼마인가요?",
    "한빛체육센터 2021년 요가 정원은 몇 명인가요?",
    "푸른솔체육센터 2024년 골프 레슨 이용료는?",
    "누리체육센터 수영 강사의 이름은 무엇인가요?",
    "시립남부병원 내과 진료 시간은?",
    "시립중앙병원 치과 토요일 진료 시간은?",
    "시립동부병원 응급실 전화번호는 무엇인가요?",
    "가온시 2020년 중앙동 인구는 몇 명인가요?",
    "다온시 2023년 중앙동 세대수는?",
    "나래시 2022년 중앙동 65세 이상 인구는?",
    "한국문화재단 규정에서 육아휴직은 몇 년까지 쓸 수 있나요?",
    "미래산업진흥원 2020년 여비 규정의 일비는 얼마인가요?",
    "가온우주도서관의 장서 수는 몇 권인가요?",
    "2022년 가온시 공공도서관 연간 이용자 합계는?",
    "다온대학교 공학 계열 수업료는 얼마인가요?",
    "가온대학교 약학 계열 수업료는?",
    "가온시 공영주차장 전기차 충전 요금은 얼마인가요?",
    "나래시 공영주차장 버스 1일 최대 요금은?",
    "2022년 주택용 전기요금 1단계 기본요금은?",
    "산업용 전기요금 2단계 전력량요금은?",
    "북구에서 음식물 쓰레기는 몇 시에 내놓나요?",
    "한국문화재단 2024년 해외 공연 사업 집행률은?",
    "미래산업진흥원 직원은 모두 몇 명인가요?",
    "2024년 최저임금은 시간당 얼마인가요?",
    "서구 폐가전 무상 방문 수거 신청 전화번호는?",
]


def write_questions(path: Path) -> None:
    """The questions as JSON, the format ``rag_with_tables.py evaluate --questions`` reads."""
    items = [
        {"question": q.question, "file": q.file, "contains": list(q.contains), "answer": q.answer, "kind": q.kind}
        for q in questions()
    ]
    path.write_text(json.dumps(items, ensure_ascii=False, indent=1), encoding="utf-8")
