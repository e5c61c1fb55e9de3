"""The figures in the tables of RESULTS.md and README.md match the JSON under
benchmarks/results/ that they come from, to the printed precision.

A table is checked against the JSON files named in the text directly above it (from the previous
table or heading down to the table). Unless the table says more, every number in it but those of
the first column (the row's name) must be a number of those files, and a `mean ± std` pair two
numbers of one JSON object. A table says more with an HTML comment right above it, which a
rendered page does not show:

  <!-- values
  file: protocol_cifar10.json
  rows: official/base; teacher_eval/base
  DWA: rows.{row}.sets.dwa.best_mean ± rows.{row}.sets.dwa.best_std
  DWA − random real: [DWA] − [random real]
  -->

`file` is where a path without a file name is read; `rows` gives each body row, in order, its
`{row}` (text put into the expressions). Every other line maps a column, by its header, to each
cell's value: a key path (keys joined by dots, list indices as numbers; `other.json:path` reads
another file), `a ± b`, a list `a, b, c`, arithmetic with ` − `, ` + `, ` × `, ` / ` (left to
right), `mean(a; b; c)` or `std(a; b; c)` (sample std), a number, or `[header]` (that column's
value in the same row). A line `row N HEADER: ...` maps the cell of body row N (from 1) alone.
Every number of such a table must be mapped; a cell without a number (`—`, empty) is skipped, and
numbers in `code` are not figures. The files it reads must be named above the table or in it,
where a reader sees them. `<!-- not from a JSON: WHY -->` right above a table exempts it.
"""

import dataclasses
import json
import math
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
DOCUMENTS = ("RESULTS.md", "README.md")
# Tables whose caption names a JSON but whose figures come from elsewhere, by first header cell.
NOT_FROM_A_JSON = {
    "weights read as": "the Δθ table of the accelerator section: tests/test_arithmetic.py",
}
# Names of files that runs write into a workdir; a caption may name them without meaning a
# file of benchmarks/results/.
WORKDIR_FILES = {"results.json", "recover.json", "config.json", "manifest.json", "sets.json",
                 "teacher.json", "result.json", "fingerprint.json"}
NUMBER = re.compile(r"[−+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
JSON_NAME = re.compile(r"[\w./-]*?([\w-]+\.json)\b")


@dataclasses.dataclass
class Table:
  document: str
  line: int
  header: list[str]
  rows: list[list[str]]
  caption: str           # the text directly above the table
  marker: str | None     # the body of a `<!-- values ... -->` comment above it, if any
  exempt: str | None     # why it is not checked, if it is not

  @property
  def id(self) -> str:
    return f"{self.document}:{self.line}"


def cells(line: str) -> list[str]:
  return [c.strip() for c in line.strip().strip("|").split("|")]


def tables(document: str, text: str | None = None) -> list[Table]:
  lines = (text if text is not None else (REPO / document).read_text()).splitlines()
  found, caption, comment, i = [], [], [], 0
  while i < len(lines):
    line = lines[i]
    if line.lstrip().startswith("```"):  # a code block: neither caption nor table
      i += 1
      while i < len(lines) and not lines[i].lstrip().startswith("```"):
        i += 1
      caption, comment = [], []
    elif line.startswith("#"):
      caption, comment = [], []
    elif line.lstrip().startswith("<!--"):
      block = [line]
      while "-->" not in block[-1]:
        i += 1
        block.append(lines[i])
      comment = block
    elif line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|[\s|:-]+\|?",
                                                                       lines[i + 1].strip()):
      start = i
      body = []
      i += 2
      while i < len(lines) and lines[i].startswith("|"):
        body.append(cells(lines[i]))
        i += 1
      note = "\n".join(comment).strip()
      marker = exempt = None
      if note.startswith("<!-- values"):
        marker = note[len("<!-- values"):].rsplit("-->", 1)[0]
      elif note.startswith("<!-- not from a JSON:"):
        exempt = note
      header = cells(lines[start])
      exempt = exempt or NOT_FROM_A_JSON.get(plain(header[0]))
      found.append(Table(document, start + 1, header, body, "\n".join(caption), marker, exempt))
      caption, comment = [], []
      continue
    elif line.strip():
      caption.append(line)
    i += 1
  return found


def plain(cell: str) -> str:
  return cell.replace("**", "").replace("`", "").strip()


def figures(cell: str) -> str:
  """The cell without markup and without `code` (names such as `cifar10_jpeg`)."""
  return re.sub(r"`[^`]*`", " ", cell).replace("**", "").strip()


def numbers(cell: str) -> list[tuple[float, int]]:
  """(value, decimals printed) of each number in a cell."""
  out = []
  for match in NUMBER.finditer(figures(cell)):
    text = match.group().replace("−", "-").replace(",", "")
    decimals = len(text.split(".")[1]) if "." in text else 0
    out.append((float(text), decimals))
  return out


def named_files(caption: str) -> list[str]:
  names = []
  for match in JSON_NAME.finditer(caption):
    name = match.group(1)
    if name not in WORKDIR_FILES and name not in names:
      names.append(name)
  return names


def json_path(name: str) -> pathlib.Path:
  direct = RESULTS_DIR / name
  if direct.exists():
    return direct
  found = sorted(RESULTS_DIR.rglob(name))
  assert found, f"{name} is not under benchmarks/results/"
  return found[0]


_LOADED: dict = {}


def load(name: str):
  if name not in _LOADED:
    _LOADED[name] = json.loads(json_path(name).read_text())
  return _LOADED[name]


def resolve(tree, path: str, where: str) -> float:
  """The number at a dotted key path; a key may itself hold dots (the longest key that fits is
  taken)."""
  node, rest = tree, path
  while rest:
    if isinstance(node, dict):
      keys = [k for k in node if rest == k or rest.startswith(k + ".")]
      if not keys:
        raise KeyError(f"{where}: no key {rest.split('.')[0]!r} (path {path!r}; keys here: "
                       f"{sorted(node)[:12]})")
      key = max(keys, key=len)
    elif isinstance(node, list):
      key = rest.split(".")[0]
      if not key.isdigit() or int(key) >= len(node):
        raise KeyError(f"{where}: no index {key!r} (path {path!r})")
    else:
      raise KeyError(f"{where}: path {path!r} goes past a value")
    node = node[int(key)] if isinstance(node, list) else node[key]
    rest = rest[len(key) + 1:]
  if isinstance(node, bool) or not isinstance(node, (int, float)):
    raise KeyError(f"{where}: {path!r} is {node!r}, not a number")
  return float(node)


@dataclasses.dataclass
class Spec:
  default_file: str | None
  rows: list[str] | None
  columns: dict[str, str]
  cells: dict[tuple[int, str], str]


def parse_marker(marker: str) -> Spec:
  default_file, rows, columns, single = None, None, {}, {}
  for line in marker.strip().splitlines():
    key, sep, value = line.strip().partition(": ")
    assert sep, f"values comment line without ': ': {line!r}"
    one = re.fullmatch(r"row (\d+) (.+)", key)
    if key == "file":
      default_file = value.strip()
    elif key == "rows":
      rows = [r.strip() for r in value.split(";")]
    elif one:
      single[(int(one.group(1)) - 1, one.group(2))] = value.strip()
    else:
      columns[key] = value.strip()
  return Spec(default_file, rows, columns, single)


class Evaluator:
  """The values of one row's cells under a table's `values` comment."""

  def __init__(self, spec: Spec, index: int, where: str):
    self.spec, self.index, self.where = spec, index, where
    self.row = spec.rows[index] if spec.rows else None

  def column(self, header: str) -> list[float]:
    text = self.spec.cells.get((self.index, header), self.spec.columns.get(header))
    assert text is not None, f"{self.where}: no mapping for column {header!r}"
    return self.expression(text)

  def expression(self, text: str) -> list[float]:
    if self.row is not None:
      text = text.replace("{row}", self.row)
    values = []
    for item in text.split(", "):
      for part in item.split(" ± "):
        values.append(self.arithmetic(part.strip()))
    return values

  def arithmetic(self, text: str) -> float:
    tokens = re.split(r" ([−+×/]) ", text)
    value = self.term(tokens[0])
    for op, term in zip(tokens[1::2], tokens[2::2]):
      other = self.term(term)
      value = {"−": value - other, "+": value + other, "×": value * other,
               "/": value / other}[op]
    return value

  def term(self, text: str) -> float:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
      return self.column(text[1:-1])[0]
    function = re.fullmatch(r"(mean|std)\((.*)\)", text)
    if function:
      values = [self.arithmetic(a) for a in function.group(2).split("; ")]
      mean = sum(values) / len(values)
      if function.group(1) == "mean":
        return mean
      return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    if re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", text):
      return float(text)
    name, sep, path = text.partition(":")
    if not (sep and name.endswith(".json")):
      assert self.spec.default_file, f"{self.where}: {text!r} names no file and there is no file:"
      name, path = self.spec.default_file, text
    return resolve(load(name), path, f"{self.where} ({name})")


def agrees(value: float, printed: float, decimals: int) -> bool:
  return abs(value - printed) <= 0.5 * 10.0 ** -decimals * (1 + 1e-9) + 1e-12


def check_marked(table: Table) -> list[str]:
  """Every number of the table against its mapping; the problems found."""
  spec = parse_marker(table.marker)
  problems = []
  if spec.rows is not None and len(spec.rows) != len(table.rows):
    return [f"{table.id}: rows: names {len(spec.rows)} rows, the table has {len(table.rows)}"]
  headers = [plain(h) for h in table.header]
  for r, row in enumerate(table.rows):
    for header, cell in list(zip(headers, row))[1:]:
      printed = numbers(cell)
      if not printed:
        continue
      where = f"{table.id} row {r + 1} ({plain(row[0])!r}), column {header!r}"
      try:
        values = Evaluator(spec, r, where).column(header)
      except (AssertionError, KeyError) as e:
        problems.append(str(e))
        continue
      if len(values) != len(printed):
        problems.append(f"{where}: {cell!r} holds {len(printed)} numbers, the mapping "
                        f"gives {len(values)}")
        continue
      for value, (number, decimals) in zip(values, printed):
        if not agrees(value, number, decimals):
          problems.append(f"{where}: {cell!r} prints {number}, the JSON says {value:.6g}")
  return problems


def leaves(tree):
  """Every number of a JSON tree, and every object's numbers (for `mean ± std` pairs)."""
  flat, objects = [], []
  stack = [tree]
  while stack:
    node = stack.pop()
    if isinstance(node, dict):
      here = [float(v) for v in node.values()
              if isinstance(v, (int, float)) and not isinstance(v, bool)]
      objects.append(here)
      flat += here
      stack += [v for v in node.values() if isinstance(v, (dict, list))]
    elif isinstance(node, list):
      flat += [float(v) for v in node if isinstance(v, (int, float)) and not isinstance(v, bool)]
      stack += [v for v in node if isinstance(v, (dict, list))]
  return flat, objects


def check_unmarked(table: Table, files: list[str]) -> list[str]:
  """Every number of the table is a number of the named files (a ± pair: of one object)."""
  flat, objects = [], []
  for name in files:
    f, o = leaves(load(name))
    flat += f
    objects += o
  problems = []
  for r, row in enumerate(table.rows):
    for header, cell in list(zip(table.header, row))[1:]:
      text = figures(cell)
      pairs = list(re.finditer(rf"({NUMBER.pattern}) ± ({NUMBER.pattern})", text))
      for match in pairs:
        (mean, dm), (std, ds) = numbers(match.group(1)) + numbers(match.group(2))
        if not any(any(agrees(a, mean, dm) for a in obj) and any(agrees(b, std, ds) for b in obj)
                   for obj in objects):
          problems.append(f"{table.id} row {r + 1}, column {plain(header)!r}: {cell!r}: no object "
                          f"of {files} holds {match.group()}")
      rest = re.sub(rf"({NUMBER.pattern}) ± ({NUMBER.pattern})", " ", text)
      for number, decimals in numbers(rest):
        if not any(agrees(v, number, decimals) for v in flat):
          problems.append(f"{table.id} row {r + 1}, column {plain(header)!r}: {cell!r}: "
                          f"{number} is not in {files}")
  return problems


def check(table: Table) -> list[str]:
  if table.exempt:
    return []
  if table.marker is not None:
    return check_marked(table)
  files = named_files(table.caption)
  return check_unmarked(table, files) if files else []


ALL_TABLES = [t for document in DOCUMENTS for t in tables(document)]
CHECKED = [t for t in ALL_TABLES
           if not t.exempt and (t.marker is not None or named_files(t.caption))]


@pytest.mark.parametrize("table", CHECKED, ids=lambda t: t.id)
def test_table_matches_its_json(table):
  problems = check(table)
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("table", [t for t in CHECKED if t.marker is not None], ids=lambda t: t.id)
def test_a_marked_table_names_its_files_where_a_reader_sees_them(table):
  """The files of a `values` comment are named where a reader sees them: in the text above the
  table or in the table."""
  spec = parse_marker(table.marker)
  used = {spec.default_file} if spec.default_file else set()
  used |= set(re.findall(r"([\w-]+\.json):", table.marker))
  visible = "\n".join([table.caption, *("|".join(row) for row in table.rows)])
  shown = set(named_files(visible))
  assert used <= shown, f"{table.id}: {sorted(used - shown)} not named above the table or in it"


def test_every_json_named_exists():
  for document in DOCUMENTS:
    for name in named_files((REPO / document).read_text()):
      json_path(name)


def test_the_main_tables_are_checked():
  marked = [t for t in CHECKED if t.marker is not None]
  assert len([t for t in marked if t.document == "RESULTS.md"]) >= 10
  assert any(t.document == "README.md" for t in marked)


def drifted(table: Table, r: int, c: int, k: int) -> Table:
  """The table with the k-th number of one cell moved by one printed unit, away from its JSON
  value."""
  cell = table.rows[r][c]
  match = list(NUMBER.finditer(figures(cell)))[k]
  cell = figures(cell)
  number, decimals = numbers(match.group())[0]
  step = 10.0 ** -decimals
  spec = parse_marker(table.marker)
  value = Evaluator(spec, r, "").column(plain(table.header[c]))[k]
  moved = number - step if value >= number else number + step
  text = f"{moved:.{decimals}f}"
  rows = [list(row) for row in table.rows]
  rows[r][c] = cell[:match.start()] + text + cell[match.end():]
  return dataclasses.replace(table, rows=rows)


@pytest.mark.parametrize("table", [t for t in CHECKED if t.marker is not None], ids=lambda t: t.id)
def test_a_figure_moved_by_one_printed_unit_fails(table):
  """Strict to the last printed digit: every mapped number, moved by one unit, is caught."""
  assert not check(table)
  for r, row in enumerate(table.rows):
    for c, cell in enumerate(row[1:], start=1):
      for k in range(len(NUMBER.findall(figures(cell)))):
        assert check(drifted(table, r, c, k)), (table.id, r, c, k, cell)


def test_the_checker_reads_tables_markers_and_exemptions():
  text = "\n".join([
      "## A", "Caption naming `demo_spread.json`.", "",
      "<!-- values", "file: demo_spread.json", "rows: dwa; sre2l",
      "mean: summary.{row}.best_mean ± summary.{row}.best_std_over_runs",
      "DWA − SRe2L: [mean] − summary.sre2l.best_mean", "-->",
      "| set | mean | DWA − SRe2L |", "|---|---|---|",
      "| DWA | 92.50 ± 1.27 | −0.89 |", "| SRe2L | **93.39 ± 0.72** | 0.00 |", "",
      "Unmarked, naming `demo_spread.json`:", "| seed | DWA |", "|---|---|", "| 0 | 90.34 |",
      "", "<!-- not from a JSON: a test -->", "| x | y |", "|---|---|", "| a | 1.23 |"])
  marked, unmarked, exempt = tables("example.md", text)
  assert check(marked) == [] and check(unmarked) == [] and exempt.exempt and check(exempt) == []
  assert unmarked.caption.startswith("Unmarked") and named_files(unmarked.caption) == [
      "demo_spread.json"]
  wrong = dataclasses.replace(unmarked, rows=[["0", "90.35"]])
  assert check(wrong)
  assert check(dataclasses.replace(marked, rows=marked.rows[:1]))  # a row too few
