"""Markup to plain text for the study corpus (scripts/build_corpus.py): HTML manuals, roff man
pages, the Brown corpus's tagged words and dictd dictionaries."""

from __future__ import annotations

import re
from html.parser import HTMLParser

BLOCK_TAGS = {
    "p",
    "div",
    "br",
    "li",
    "ul",
    "ol",
    "dl",
    "dt",
    "dd",
    "tr",
    "table",
    "pre",
    "section",
    "blockquote",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "article",
    "hr",
    "figure",
    "td",
    "th",
}
SKIP_TAGS = {"script", "style", "head", "nav", "aside", "noscript", "svg", "button", "form"}
# Navigation by exact class / id token (a substring test would also hit e.g. the
# <html class="sidebar-visible"> of mdBook and drop the whole page).
SKIP_TOKENS = {
    "sphinxsidebar",
    "related",
    "navheader",
    "navfooter",
    "footer",
    "leftnav",
    "headerlink",
    "bd-sidebar-primary",
    "bd-sidebar-secondary",
    "bd-header",
    "prev-next-area",
    "breadcrumbs",
    "nav",
    "menu-bar",
    "toc",
    "searchbar",
}
SKIP_IDS = {"sidebar", "menu-bar", "toc", "leftnav", "searchbar"}


def is_navigation(tag: str, attrs: list[tuple[str, str | None]]) -> bool:
    if tag in SKIP_TAGS:
        return True
    for key, value in attrs:
        if key == "id" and value in SKIP_IDS:
            return True
        # DocBook's <div class="sidebar"> is a boxed aside worth keeping; other themes'
        # sidebars are <nav>/<aside> or carry a more specific class
        if key == "class" and value and SKIP_TOKENS.intersection(value.split()):
            return True
    return False


class HtmlText(HTMLParser):
    """HTML to plain text: block elements become line breaks, <pre> keeps its layout, and
    navigation (scripts, sidebars, headers, footers) is dropped."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip_tag: str | None = None
        self.skip_depth = 0
        self.pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip_tag:
            self.skip_depth += tag == self.skip_tag
            return
        if is_navigation(tag, attrs):
            self.skip_tag, self.skip_depth = tag, 1
            return
        if tag == "pre":
            self.pre += 1
        if tag in BLOCK_TAGS:
            self.out.append("\n")
        if tag == "li":
            self.out.append("- ")

    def handle_endtag(self, tag: str) -> None:
        if self.skip_tag:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in BLOCK_TAGS:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip_tag:
            self.out.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(source: str) -> str:
    parser = HtmlText()
    parser.feed(source)
    parser.close()
    # outside <pre> whitespace is already collapsed to one space: drop that one
    lines = [
        line[1:].rstrip() if line.startswith(" ") and not line.startswith("  ") else line.rstrip()
        for line in "".join(parser.out).split("\n")
    ]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


ROFF_ESCAPES = {
    r"\(em": "—",
    r"\(en": "–",
    r"\(aq": "'",
    r"\(dq": '"',
    r"\(bu": "•",
    r"\(lq": '"',
    r"\(rq": '"',
    r"\(oq": "'",
    r"\(cq": "'",
    r"\(co": "©",
    r"\(ga": "`",
    r"\(ti": "~",
    r"\(ha": "^",
    r"\(rs": "\\",
    r"\-": "-",
    r"\e": "\\",
    r"\&": "",
    r"\|": "",
    r"\^": "",
    r"\ ": " ",
    r"\~": " ",
    r"\c": "",
}
ROFF_RE = re.compile(r"\\f(?:\[[^\]]*\]|\(..|.)|\\s[+-]?\d+|\\\*(?:\(..|\[[^\]]*\]|.)|\\\(..|\\.")


FILL_OFF, FILL_ON = ("nf", "EX"), ("fi", "EE")
ALTERNATING = ("BR", "IR", "RB", "BI", "IB", "RI")  # fonts alternate, words join unspaced
PARAGRAPH = ("PP", "P", "LP", "sp", "TP", "IP", "HP", "br", "RS", "RE")


def roff_args(arg: str) -> list[str]:
    return [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', arg)]


def roff_to_text(source: str) -> str:
    """man(7) source to plain text: filled paragraphs joined into lines, no-fill blocks (code
    examples) kept as they are, section headings on their own line, font escapes dropped."""
    out: list[str] = []
    para: list[str] = []
    fill = True

    def flush() -> None:
        if para:
            out.append(" ".join(para))
            para.clear()

    source = re.sub(r"(?<!\\)\\\n", "", source)  # a trailing backslash continues the line
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"")) or line.strip() in (".", "'"):
            continue
        if not line.startswith((".", "'")):
            (para if fill else out).append(line)
            continue
        req, _, arg = line[1:].strip().partition(" ")
        if req in ("SH", "SS", "TH"):
            flush()
            out += ["", " ".join(roff_args(arg))]
        elif req in ALTERNATING:
            (para if fill else out).append("".join(roff_args(arg)))
        elif req in ("B", "I", "SM", "SB"):
            (para if fill else out).append(" ".join(roff_args(arg)))
        elif req in PARAGRAPH or req in FILL_OFF or req in FILL_ON:
            flush()
            if req in FILL_OFF + FILL_ON:
                fill = req in FILL_ON
            out.append("")
            if req == "IP" and arg:
                out.append(roff_args(arg)[0])
    flush()
    text = ROFF_RE.sub(lambda m: ROFF_ESCAPES.get(m.group(0), ""), "\n".join(out))
    return re.sub(r"\n{3,}", "\n\n", text)


def brown_to_text(source: str) -> str:
    """Brown corpus 'word/tag' tokens back to running text."""
    sentences = []
    for line in source.split("\n"):
        words = [tok.rsplit("/", 1)[0] for tok in line.split()]
        if words:
            sentence = " ".join(words).replace("``", '"').replace("''", '"')
            sentence = re.sub(r" ([,.;:?!)'])", r"\1", sentence)
            sentences.append(re.sub(r"([(]) ", r"\1", sentence))
    return " ".join(sentences)


def dict_entries(source: str) -> str:
    """A dictd .dict file without its 00-database-* header entries."""
    start = source.find("\n\n", source.rfind("00-database-") if "00-database-" in source else 0)
    return source[start:].strip() if start > 0 else source
