"""The benchmarks page shows the numbers of the committed JSON (data/bench_*.json).

``docs/benchmarks.md`` holds no table of numbers: its markers become tables
when the site is built (the hook ``docs/_hooks/benchmarks.py``). Here the page
is built by MkDocs with that hook (a site of this one page, so it takes
seconds) and every number of its tables is compared with the JSON read
independently, so a hand-edited or stale table fails.
"""

from __future__ import annotations

import html.parser
import json
import pathlib
import re
from typing import Any

import pytest
from mkdocs.commands.build import build
from mkdocs.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "benchmarks.md"
MARKERS = re.findall(r"^<!-- benchmark: (\S+) -->$", PAGE.read_text(), re.MULTILINE)


class Tables(html.parser.HTMLParser):
    """The tables of an HTML page (rows of cell texts), each with the text of the paragraph before it."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict[str, Any]] = []
        self.paragraph, self.text, self.cell = "", "", None
        self.in_paragraph = False

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag == "p":
            self.in_paragraph, self.text = True, ""
        elif tag == "table":
            self.tables.append({"caption": self.paragraph, "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "p":
            self.in_paragraph, self.paragraph = False, self.text
        elif tag in ("td", "th") and self.cell is not None:
            self.tables[-1]["rows"][-1].append(self.cell.strip())
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell += data
        elif self.in_paragraph:
            self.text += data


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Build a site of the benchmarks page alone with the hook; its tables by JSON file."""
    folder = tmp_path_factory.mktemp("site")
    (folder / "docs").mkdir()
    (folder / "docs" / "index.md").write_text((PAGE).read_text())
    config = {
        "site_name": "benchmarks",
        "docs_dir": "docs",
        "site_dir": "site",
        "theme": {"name": "mkdocs"},
        "hooks": [str(ROOT / "docs" / "_hooks" / "benchmarks.py")],
        "markdown_extensions": ["tables", "attr_list", "admonition"],
    }
    (folder / "mkdocs.yml").write_text(json.dumps(config))  # JSON is YAML
    build(load_config(str(folder / "mkdocs.yml")))
    parser = Tables()
    parser.feed((folder / "site" / "index.html").read_text())
    numbered = [t for t in parser.tables if "Generated from" in t["caption"]]
    assert len(numbered) == len(MARKERS)
    return {path: {"caption": t["caption"], "rows": t["rows"]} for path, t in zip(MARKERS, numbered, strict=True)}


def close(shown: str, value: float) -> bool:
    """A table's number (4 significant digits, or 2 for ``x.xe-yy``) equals the JSON's to its precision."""
    digits = 2 if "e" in shown else 4
    return abs(float(shown) - value) <= 0.51 * 10.0 ** (-digits + 1) * abs(value) + 1e-300


def read(path: str) -> Any:
    return json.loads((ROOT / path).read_text())


def test_every_benchmark_json_is_on_the_page_and_no_table_is_typed() -> None:
    assert sorted(MARKERS) == sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("data/bench_*.json"))
    typed = [line for line in PAGE.read_text().splitlines() if line.startswith("|") and re.search(r"\d", line)]
    assert typed == [], "numbers in a hand-typed table of docs/benchmarks.md"


def test_captions_name_the_file_and_what_it_recorded(built: dict[str, dict[str, Any]]) -> None:
    for path, table in built.items():
        data = read(path)
        caption = table["caption"]
        assert path in caption
        for key in ("machine", "date"):
            recorded = data.get(key) if isinstance(data, dict) else None
            assert (recorded or f"{key}: not recorded in the JSON") in caption


@pytest.mark.parametrize(
    "path",
    ["data/bench_relax_peers.json", "data/bench_relax_peers_one_core.json", "data/bench_relax_peers_one_core_1e5.json"],
)
def test_relaxation_against_lammps(built: dict[str, dict[str, Any]], path: str) -> None:
    data = read(path)
    header, *rows = built[path]["rows"]
    shown = {(row[0], row[1], row[2]): dict(zip(header, row, strict=True)) for row in rows}
    count = 0
    for n, seeds in data["results"].items():
        for seed, runs in seeds.items():
            for code, run in runs.items():
                if "steps" not in run:
                    continue
                row = shown[n, seed, code]
                assert int(row["steps"]) == run["steps"]
                assert close(row["CPU s"], run["cpu_s"]) and close(row["wall s"], run["wall_s"])
                assert close(row["CPU ms/step"], run["cpu_ms_per_step"])
                assert close(row["final fmax"], run["fmax"])
                count += 1
    assert count == len(rows) > 0


#: JSON key and column of each preconditioner of scripts/bench_scale.py.
PRECONDITIONERS = {"none": "CG: none", "jacobi": "Jacobi", "block_jacobi": "block Jacobi", "two_level": "two-level"}


def shown_iterations(header: list[str], row: list[str]) -> list[str]:
    return [row[header.index(column)] for column in PRECONDITIONERS.values()]


def recorded_iterations(solves: dict[str, Any]) -> list[str]:
    """What the page must show: the count, or a dash where the run did not measure it."""
    return [str(solves[key]["cg_iterations"]) if key in solves else "—" for key in PRECONDITIONERS]


def test_preconditioners(built: dict[str, dict[str, Any]]) -> None:
    data = read("data/bench_preconditioners.json")
    header, *rows = built["data/bench_preconditioners.json"]["rows"]
    assert len(rows) == len(data["results"])
    for row, run in zip(rows, data["results"], strict=True):
        assert (int(row[0]), float(row[1])) == (run["n"], run["phi"])
        assert shown_iterations(header, row) == recorded_iterations(run["solves"])


@pytest.mark.parametrize("path", ["data/bench_study_quiet.json", "data/bench_study_loaded.json"])
def test_study(built: dict[str, dict[str, Any]], path: str) -> None:
    data = read(path)
    header, *rows = built[path]["rows"]
    methods = [key for key in ("loop", "study_1dev", "study_Ndev") if key in data]
    assert len(rows) == len(methods)
    for row, key in zip(rows, methods, strict=True):
        shown = dict(zip(header, row, strict=True))
        assert close(shown["wall s"], data[key]["seconds"])
        assert close(shown["CPU s/sample"], data[key]["cpu_per_sample"])
        assert close(shown["samples/s"], data[key]["samples_per_second"])


def test_sensitivities(built: dict[str, dict[str, Any]]) -> None:
    data = read("data/bench_sensitivity.json")
    header, *rows = built["data/bench_sensitivity.json"]["rows"]
    shown = {(int(row[0]), row[1].split(" (")[0]): dict(zip(header, row, strict=True)) for row in rows}
    for result in data["results"]:
        relax = shown[result["n"], "relaxation, FIRE"]
        assert close(relax["wall s"], result["relax_s"]) and int(relax["count"]) == result["relax_steps"]
        jvp = shown[result["n"], "implicit JVP dx*/d(small diameter)"]
        assert int(jvp["count"]) == result["cg_iterations_jvp"]
        assert close(jvp["wall s"], result["implicit_jvp_s"])
        assert close(jvp["error vs dense"], result["implicit_jvp_error"])
        gradient = shown[result["n"], "implicit gradient, all N diameters"]
        assert int(gradient["count"]) == result["cg_iterations_grad"]
        assert close(gradient["error vs dense"], result["implicit_grad_error"])


@pytest.mark.parametrize("path", ["data/bench_scale.json", "data/bench_scale_one_core.json"])
def test_scale(built: dict[str, dict[str, Any]], path: str) -> None:
    data = read(path)
    header, *rows = built[path]["rows"]
    assert len(rows) == len(data["results"])
    for row, result in zip(rows, data["results"], strict=True):
        shown = dict(zip(header, row, strict=True))
        assert int(shown["N"]) == result["n"] and int(shown["FIRE steps"]) == result["relax_steps"]
        assert shown_iterations(header, row) == recorded_iterations(result["solves"])
        assert close(shown["force CPU ms"], result["eval_ms"]["force"]["cpu_ms"])
