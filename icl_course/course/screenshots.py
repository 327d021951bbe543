"""Look at the built book the way a reader does: a full-page screenshot of every page, and a report.

``make screenshots`` (after ``make book``) opens every page of ``_build/html`` in headless Chromium
with the network off, as a downloaded copy of the book would be read, writes one PNG per page to
``_build/screenshots/`` and reports, per page, what a reader would trip over:

- code lines that scroll off the column (a code block wider than its box);
- maths left as raw TeX (MathJax did not typeset it, e.g. because it needed the network);
- figures without a caption (an image from a notebook output outside a numbered figure);
- cells that show their code although all they do is display a result sentence (Markdown): plumbing
  that should be hidden (``hide-input``).

It needs Chromium (Debian: ``apt-get install chromium``) and the ``screenshots`` extra (Playwright's
Python driver, which drives that Chromium; it downloads no browser). It exits non-zero when a page has
a problem, so it can gate a release; it is not part of ``make test`` (it needs the built book).

    python -m icl_course.course.screenshots [_build/html] [--out _build/screenshots]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

# Runs in the page: what a reader would trip over (see the module docstring).
PROBE = """() => {
  const wide = [...document.querySelectorAll('article div.highlight pre')]
    .filter(p => !p.closest('.cell_output') && p.innerText.trim() && p.scrollWidth > p.clientWidth + 1)
    .map(p => p.innerText.split('\\n').reduce((a, b) => (b.length > a.length ? b : a), '').slice(0, 80));
  const text = [...document.querySelectorAll('article :is(p, li, td, th, figcaption, h1, h2, h3)')]
    .filter(e => !e.closest('pre')).map(e => e.innerText).join('\\n');
  const rawTex = (text.match(/(\\$[^$\\n]{1,40}\\\\[a-zA-Z]+[^$\\n]{0,40}\\$|\\\\\\(|\\\\\\[)/g) || []).slice(0, 5);
  const typeset = document.querySelectorAll('mjx-container').length;
  const images = [...document.querySelectorAll('article .cell_output img')];
  const uncaptioned = images.filter(img => !img.closest('figure')).map(img => img.getAttribute('src'));
  const printing = [...document.querySelectorAll('article div.cell')].filter(cell => {
    const shown = cell.querySelector('.cell_input') && !cell.querySelector('details.hide, .tag_hide-input');
    const outs = cell.querySelectorAll('.cell_output > *');
    const sentence = 'p, ul, ol, table, dl, blockquote, div.pst-scrollable-table-container';
    return shown && outs.length > 0 && [...outs].every(o => o.matches(sentence));
  }).map(cell => cell.querySelector('.cell_input').innerText.split('\\n')[0].slice(0, 60));
  return {wide, rawTex, typeset, uncaptioned, printing, height: document.documentElement.scrollHeight};
}"""


def pages(html: Path) -> list[Path]:
    """The book's pages (search, genindex and the like left out)."""
    skip = {"search.html", "genindex.html", "py-modindex.html"}
    return sorted(p for p in html.rglob("*.html") if p.name not in skip and "_static" not in p.parts
                  and "_sources" not in p.parts)


def problems(report: dict) -> list[str]:
    out = []
    if report["wide"]:
        out.append(f"{len(report['wide'])} code block(s) wider than the column, e.g. {report['wide'][0]!r}")
    if report["rawTex"]:
        out.append(f"raw TeX left: {report['rawTex'][:2]}")
    if report["uncaptioned"]:
        out.append(f"{len(report['uncaptioned'])} figure(s) without a caption")
    if report["printing"]:
        out.append(f"{len(report['printing'])} shown cell(s) that only display a sentence, e.g. {report['printing'][0]!r}")
    return out


def shoot(html: Path, out: Path, width: int = 1280) -> dict[str, dict]:
    from playwright.sync_api import sync_playwright  # the screenshots extra

    out.mkdir(parents=True, exist_ok=True)
    reports = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        context = browser.new_context(viewport={"width": width, "height": 900}, offline=True)
        page = context.new_page()
        for path in pages(html):
            name = path.relative_to(html).as_posix()
            page.goto(path.resolve().as_uri(), wait_until="load")
            page.wait_for_timeout(1500)  # MathJax typesets after load
            report = page.evaluate(PROBE)
            page.screenshot(path=str(out / (name.replace("/", "__").removesuffix(".html") + ".png")), full_page=True)
            reports[name] = report
        browser.close()
    (out / "report.json").write_text(json.dumps(reports, indent=1) + "\n")
    return reports


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html", nargs="?", type=Path, default=Path("_build/html"))
    parser.add_argument("--out", type=Path, default=Path("_build/screenshots"))
    args = parser.parse_args(argv)
    if not (args.html / "index.html").exists():
        print(f"no built book at {args.html}: run `make book` first", file=sys.stderr)
        return 2
    reports = shoot(args.html, args.out)
    bad = 0
    for name, report in reports.items():
        found = problems(report)
        bad += bool(found)
        print(f"{'!!' if found else 'ok'} {name} ({report['typeset']} formulas typeset)" + "".join(f"\n   - {p}" for p in found))
    print(f"{len(reports)} pages, {bad} with problems; screenshots in {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
