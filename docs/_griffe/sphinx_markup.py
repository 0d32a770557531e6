"""A Griffe extension that renders mdsens's docstrings, written for Sphinx, in MkDocs.

- Roles (``:func:`~mdsens.relax```, ``:class:`System```; func, class, meth, attr,
  data, mod) become cross-references to the object's canonical path, resolved
  in the scope of the documented object; mkdocs-autorefs then fails a strict
  build on any target that no page documents. Targets outside mdsens
  (``jax.jit``) stay code.
- ``:math:`...``` and ``.. math::`` become MathJax (pymdownx.arithmatex).
- ``text::`` before a literal block becomes ``text:`` (the indented block is
  Markdown code already); underlined section titles become bold lines.
- ``#:`` comments above module attributes, and the entries of a class's
  ``Attributes:`` section, become the attributes' docstrings.
- Special methods other than ``__call__`` are not listed (``__init__`` is
  merged into its class).
- The front door: objects that ``mdsens/__init__.py`` re-exports (``X as X``)
  are documented once, as ``mdsens.X``; their modules' pages point there.

Configured in mkdocs.yml (``extensions`` of the Python handler).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROOT = "mdsens"
ROLE = re.compile(r":(func|class|meth|attr|data|mod|obj|exc):`(~?)([^`<]+?)(?:\s*<([^`>]+)>)?`")
INLINE_MATH = re.compile(r":math:`([^`]+)`")
DIRECTIVE = re.compile(r"^(\s*)\.\. math::\s*(.*)$")
UNDERLINE = re.compile(r"^\s*([-=~^])\1{2,}\s*$")


def _canonical(obj: griffe.Object, target: str) -> str | None:
    """The canonical path of ``target`` seen from ``obj``; None outside mdsens.
    A name that does not resolve keeps its path, for autorefs to report."""
    head, _, rest = target.partition(".")
    if head != ROOT:
        try:
            head = obj.resolve(head)
        except (griffe.NameResolutionError, AttributeError):
            return None
    path = f"{head}.{rest}" if rest else head
    if not path.startswith(ROOT + ".") and path != ROOT:
        return None
    try:
        path = obj.modules_collection.get_member(path).canonical_path
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return path
    # Private helpers are not documented on purpose: name them as code.
    return None if path.rsplit(".", 1)[-1].startswith("_") else path


def _role(obj: griffe.Object, match: re.Match[str]) -> str:
    _, short, title, explicit = match.groups()
    target = (explicit or title).strip()
    label = title.strip() if explicit else (target.rsplit(".", 1)[-1] if short else target)
    path = _canonical(obj, target)
    return f"`{label}`" if path is None else f"[`{label}`][{path}]"


def _math_blocks(lines: list[str]) -> list[str]:
    """``.. math::`` directives (a first line and an indented continuation) as ``$$`` blocks."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = DIRECTIVE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent, first = len(match.group(1)), match.group(2)
        body = [first] if first.strip() else []
        i += 1
        # The directive ends at the first non-blank line back at its indentation.
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
            body.append(lines[i].strip())
            i += 1
        pad = " " * indent
        # Blank-separated equations are separate displays, as in Sphinx.
        for equation in "\n".join(body).strip().split("\n\n"):
            out += ["", f"{pad}$$", *(pad + line for line in equation.strip().splitlines()), f"{pad}$$", ""]
    return out


def _titles(lines: list[str]) -> list[str]:
    """RST section titles (a line underlined with -, =, ~ or ^) as bold lines."""
    out: list[str] = []
    for line in lines:
        if UNDERLINE.match(line) and out and out[-1].strip() and len(line.strip()) == len(out[-1].strip()):
            out[-1] = f"**{out[-1].strip()}**"
            out.append("")  # the title is a paragraph of its own
        else:
            out.append(line)
    return out


def convert(obj: griffe.Object, text: str) -> str:
    """Sphinx markup in a docstring of ``obj`` as Markdown for mkdocstrings."""
    lines = _titles(_math_blocks(text.splitlines()))
    # "text::" introduces a literal block: keep one colon ("text ::" keeps none).
    lines = [re.sub(r"\s+::$", "", re.sub(r"(\S)::$", r"\1:", line)) for line in lines]
    text = INLINE_MATH.sub(lambda m: f"${m.group(1)}$", "\n".join(lines))
    return ROLE.sub(lambda m: _role(obj, m), text)


def _comment_docstring(attribute: griffe.Object) -> str | None:
    """The ``#:`` comment lines right above a module attribute, if any."""
    module = attribute.parent
    if attribute.lineno is None or module is None or not module.is_module:
        return None
    comments: list[str] = []
    index = attribute.lineno - 2
    while index >= 0 and module.lines[index].lstrip().startswith("#:"):
        comments.insert(0, module.lines[index].lstrip()[2:].strip())
        index -= 1
    return " ".join(comments) or None


def _document_attributes(cls: griffe.Object) -> None:
    """Each entry of the class docstring's ``Attributes:`` section as its attribute's docstring."""
    if cls.docstring is None:
        return
    for section in cls.docstring.parse("google", warnings=False):
        if section.kind is not griffe.DocstringSectionKind.attributes:
            continue
        for entry in section.value:
            member = cls.members.get(entry.name)
            if member is not None and not member.is_alias and member.docstring is None:
                member.docstring = griffe.Docstring(entry.description, parent=member)


def _front_door(package: griffe.Module) -> None:
    """Make ``mdsens.X`` the documented place of every re-exported ``X``, and say so on its module's page."""
    moved: dict[str, list[str]] = {}
    for name, alias in package.members.items():
        line = package.lines[alias.alias_lineno - 1] if alias.is_alias and alias.alias_lineno else ""
        if not re.search(rf"\bimport {name} as {name}\b", line):
            continue
        alias.public = True
        target = alias.final_target
        target.public = False
        moved.setdefault(target.module.path, []).append(name)
    for path, names in moved.items():
        module = package.modules_collection.get_member(path)
        links = ", ".join(f"[`mdsens.{name}`][mdsens.{name}]" for name in names)
        note = f"Documented with the front door ([`mdsens`][mdsens]): {links}."
        text = module.docstring.value + "\n\n" + note if module.docstring else note
        module.docstring = griffe.Docstring(text, parent=module)


def _visit(obj: griffe.Object, seen: set[str]) -> None:
    if obj.path in seen:
        return
    seen.add(obj.path)
    if obj.is_attribute and obj.docstring is None:
        comment = _comment_docstring(obj)
        if comment:
            obj.docstring = griffe.Docstring(comment, parent=obj)
        elif obj.parent is not None and obj.parent.is_module and not obj.name.isupper():
            # An undocumented module-level type alias (Array = jax.Array): not API.
            obj.public = False
    if obj.is_function and obj.name.startswith("__") and obj.name != "__call__":
        obj.public = False  # dataclass and protocol plumbing (__post_init__, __hash__), not API
    if obj.docstring is not None:
        obj.docstring.value = convert(obj, obj.docstring.value)
    for member in obj.members.values():
        if not member.is_alias:
            _visit(member, seen)  # type: ignore[arg-type]
    if obj.is_class:  # after its members: the entries are converted already
        _document_attributes(obj)


class SphinxMarkup(griffe.Extension):
    """Converts mdsens's docstrings once the package is loaded (so that names resolve)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.path != ROOT:
            return
        _visit(pkg, set())
        _front_door(pkg)
