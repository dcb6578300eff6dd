"""The README and the notes under docs/: size, no tracker citations, links that resolve."""
import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_BYTES = 16 * 1024

# A citation of a tracker issue, a numbered acceptance point or a section of a spec
# document: "issue 4", "Issue #12", "issues 3", "acceptance 2", "acceptance point 3",
# "SPEC §3", "SPEC.md". Words such as "spec", "PartitionSpec" or "--spec=sweep.json" are
# not citations.
CITATION = re.compile(
    r"\b[Ii]ssues?\s*#?\d+"
    r"|\b[Aa]cceptance(\s+(point|criterion|item)s?)?\s*#?\d+"
    r"|\bSPEC\s*§"
    r"|\bSPEC\.md\b"
    r"|§\s*\d")

# [text](target) and ![alt](target), with an optional "title".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _doc_files():
  return [README] + sorted((ROOT / "docs").glob("*.md"))


def _text_files():
  """User-facing text: README, docs, configs, the library, the commands, bench's page."""
  files = _doc_files() + sorted((ROOT / "configs").glob("*.py"))
  for package in ("mqt", "data", "bench"):
    files += sorted((ROOT / package).rglob("*.py"))
  files += sorted(ROOT.glob("*.py")) + sorted((ROOT / "bench").glob("*.md"))
  return [f for f in files if ".venv" not in f.parts]


def _without_code(markdown: str) -> str:
  """The markdown with fenced blocks and inline code removed (code is not a link)."""
  markdown = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
  return re.sub(r"`[^`\n]*`", "", markdown)


def test_readme_is_at_most_16_kib():
  size = README.stat().st_size
  assert size <= README_MAX_BYTES, f"README.md is {size} bytes, over {README_MAX_BYTES}"


@pytest.mark.parametrize("text", [
    "as issue 4 asks", "Issue #12", "see issues 3 and 5", "issue#7", "acceptance 2",
    "Acceptance point 3", "acceptance criterion 1", "SPEC §3", "SPEC.md says", "(§ 4)"])
def test_citation_pattern_matches_citations(text):
  assert CITATION.search(text), text


@pytest.mark.parametrize("text", [
    "P = jax.sharding.PartitionSpec('data')", "python -m bench.sweep --spec=sweep.json",
    "the spec of a run", "a known issue with XLA", "Acceptance tests for data/images.py",
    "acceptance of the record", "issues with gloo", "SPECIAL = 4", "spec.md"])
def test_citation_pattern_ignores_ordinary_words(text):
  assert not CITATION.search(text), text


def test_no_file_cites_issues_acceptance_points_or_spec_sections():
  found = []
  for path in _text_files():
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
      match = CITATION.search(line)
      if match:
        found.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r}")
  assert not found, "citations a user cannot follow:\n" + "\n".join(found)


def test_relative_links_and_images_resolve():
  broken = []
  for path in _doc_files():
    for target in LINK.findall(_without_code(path.read_text(encoding="utf-8"))):
      if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
        continue  # A URL or an anchor in the same page.
      file = target.split("#", 1)[0]
      if not (path.parent / file).exists():
        broken.append(f"{path.relative_to(ROOT)}: {target}")
  assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_link_pattern_finds_links_and_images_but_not_code():
  text = "See [a](docs/a.md), ![plot](docs/p.png \"t\") and `[x](y.md)`.\n```\n[z](z.md)\n```\n"
  assert LINK.findall(_without_code(text)) == ["docs/a.md", "docs/p.png"]


def test_readme_test_command_is_the_one_ci_runs():
  ci = (ROOT / ".ci" / "run").read_text()
  command = [line for line in ci.splitlines() if line.startswith("python -m pytest")][-1]
  first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
  assert any(line.split("#")[0].strip() == command for line in first_block.splitlines()), (
      command)


@pytest.mark.parametrize("name", ["tiny", "mqt_llava"])
def test_config_docstring_gives_the_command_and_the_comparison_with_the_paper(name):
  doc = ast.get_docstring(ast.parse((ROOT / "configs" / f"{name}.py").read_text()))
  assert f"python train.py --config=configs/{name}.py" in doc
  assert "differs from the paper" in doc
