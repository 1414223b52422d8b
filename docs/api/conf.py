"""Sphinx configuration of the API reference: built from the docstrings, offline.

  sphinx-build -W -b html docs/api build/docs
"""

import inspect
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import contrastive_jax  # noqa: E402
from contrastive_jax.losses import registry  # noqa: E402

project = "contrastive_jax"
release = version = contrastive_jax.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
napoleon_google_docstring = True
napoleon_custom_sections = ["References"]
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_member_order = "bysource"
autodoc_type_aliases = {"Scalar": "Scalar"}
html_theme = "alabaster"
exclude_patterns = ["_build"]


def _first_reference(doc: str) -> str:
  """The first entry of a docstring's References section, shortened to authors and venue."""
  match = re.search(r"References:\n(.*?)(?:\n\s*\n|\Z)", doc, re.S)
  if not match:
    return ""
  text = " ".join(match.group(1).split())
  title = re.search(r'"([^"]+)"', text)
  venue = re.search(r'",?\s*(?:\([^)]*\),?\s*)?([^,]*\d{4})', text)
  return (f"{title.group(1)}" if title else text) + (f", {venue.group(1)}" if venue else "")


def _axis_note(doc: str) -> str:
  """What a loss moves between devices: its docstring's axis_name entry."""
  match = re.search(r"axis_name: (.*?)(?=\n\s{0,2}\S|\n\s*\n|\Z)", doc, re.S)
  return " ".join(match.group(1).split()) if match else ""


def _losses_table() -> str:
  rows = []
  for name, entry in registry.LOSSES.items():
    fn = entry.fn
    doc = inspect.getdoc(fn) or ""
    rows.append((f"``{name}``", f":func:`~contrastive_jax.losses.{fn.__name__}`",
                 "yes" if entry.stateful else "no", _first_reference(doc) or "-",
                 _axis_note(doc) or "see the function"))
  lines = [".. list-table:: The registered losses (`losses.registry`)", "   :header-rows: 1",
           "   :widths: 10 20 8 30 32", "",
           "   * - name", "     - function", "     - stateful", "     - paper",
           "     - across devices (``axis_name``)"]
  for row in rows:
    lines.append(f"   * - {row[0]}")
    lines += [f"     - {cell}" for cell in row[1:]]
  return "\n".join(lines) + "\n"


os.makedirs(os.path.join(os.path.dirname(__file__), "_generated"), exist_ok=True)
with open(os.path.join(os.path.dirname(__file__), "_generated", "losses_table.rst"), "w") as f:
  f.write(_losses_table())


_SECTION = re.compile(r"^\s*(Args|Arguments|Returns|Raises|Yields|Examples|Example|References|"
                      r"Attributes|Note|Notes):\s*$")


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


def literal_blocks(app, what, name, obj, options, lines) -> None:
  """The docstrings' indented formulas and layouts (free text, outside the Google sections)
  become literal blocks: they read as the plain text they are written as."""
  out, section_indent, block_indent, references = [], None, None, False
  for line in lines:
    stripped = line.strip()
    ind = _indent(line)
    if section_indent is not None and stripped and ind <= section_indent:
      section_indent = None
    if block_indent is not None and stripped and ind < block_indent:
      block_indent = None
      if out and out[-1].strip():
        out.append("")
    if section_indent is None and _SECTION.match(line):
      section_indent = ind
      references = line.strip() == "References:"
    elif section_indent is not None and references:  # "C. Chen, ..." is no enumerated list
      line = re.sub(r"^(\s*[A-Z])\. ", r"\1\\. ", line)
    elif section_indent is None and block_indent is None and stripped and out:
      prev = next((l for l in reversed(out) if l.strip()), None)
      if prev is not None and ind > _indent(prev):
        if out[-1].strip():  # the paragraph above introduces the block
          out[-1] = out[-1] + ("::" if out[-1].rstrip().endswith(":") else " ::")
          out[-1] = out[-1].replace(":::", "::")
        else:
          last = max(i for i, l in enumerate(out) if l.strip())
          out[last] = out[last] + ("::" if out[last].rstrip().endswith(":") else " ::")
          out[last] = out[last].replace(":::", "::")
        out.append("")
        block_indent = ind
    out.append(line)
  lines[:] = out


def setup(app):
  app.connect("autodoc-process-docstring", literal_blocks, priority=100)
