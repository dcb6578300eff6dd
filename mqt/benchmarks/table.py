"""One text table for results: a left-aligned label column, then right-aligned columns.

  format_table([Column("n", 5, "d"), Column("m=1", 8)],
               [Row("colour", [120, 0.5]), Row("loss", [None, 1.25])], ("type", 8))
  ->
  type        n     m=1
  ---------------------
  colour    120   0.500
  loss            1.250
"""
from typing import Any, NamedTuple, Sequence


class Column(NamedTuple):
  """A right-aligned column: its title, width and number format (a format spec)."""
  title: str
  width: int
  fmt: str = ".3f"


class Row(NamedTuple):
  """A table row.

  Attributes:
    label: The text of the label column (left-aligned).
    cells: One per column: a number (formatted with the column's, or the row's, format),
      a str (as is) or None (blank). Fewer cells than columns leave the rest out.
    fmt: The number format of this row's cells instead of the columns' ("" keeps them).
    note: Text written as is after the cells (e.g. a remark in place of cells).
  """
  label: str
  cells: Sequence[Any] = ()
  fmt: str = ""
  note: str = ""


def _cell(value: Any, fmt: str) -> str:
  if value is None:
    return ""
  return value if isinstance(value, str) else format(value, fmt)


def format_table(columns: Sequence[Column], rows: Sequence[Row],
                 label: tuple[str, int] = ("", 24), rule: str = "-") -> str:
  """The header (label title, column titles), a rule as wide as the header (none when
  `rule` is ""), then one line per row. label: (title, width) of the label column."""
  title, width = label
  head = f"{title:<{width}}" + "".join(f"{c.title:>{c.width}}" for c in columns)
  lines = [head] + ([rule * len(head)] if rule else [])
  for row in rows:
    cells = "".join(f"{_cell(v, row.fmt or c.fmt):>{c.width}}"
                    for c, v in zip(columns, row.cells))
    lines.append(f"{row.label:<{width}}" + cells + row.note)
  return "\n".join(lines)
