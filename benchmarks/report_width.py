"""Does a report page fit a browser window? Measured in headless Chromium (issue 16 "Tables fit the page").

    python benchmarks/report_width.py STUDY/report/index.html [--window 1400]

Copies the page beside itself with a script that opens every ``<details>`` and writes, into a body attribute,
each ``div.scroll`` (every table's wrapper) as scrollWidth/clientWidth, the table's width, and whether the
document itself scrolls sideways; dumps the DOM with ``chromium --headless=new`` at a 1400 × 1000 window and reads
that attribute back. Prints one line per table and,
last, one JSON line; exit code 1 when anything scrolls sideways. Without chromium on the PATH it says so and exits
0 (CI has none; tests/test_analysis.py::_check_page_structure checks the page's structure instead).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

_PROBE = """<script>
window.addEventListener('load', () => {
  const heading = (n) => {  // the nearest heading or <summary> before the table
    while (n) {
      if (!n.previousElementSibling) { n = n.parentElement; continue; }
      n = n.previousElementSibling;
      if (/^(H2|H3|SUMMARY)$/.test(n.tagName)) return n.textContent;
      const h = n.querySelectorAll('h2, h3, summary');
      if (h.length) return h[h.length - 1].textContent;
    }
    return '';
  };
  document.querySelectorAll('details').forEach((d) => { d.open = true; });  // collapsed tables count too
  const rows = [...document.querySelectorAll('div.scroll')].map((d, i) => {
    const t = d.querySelector('table');
    return [i, d.scrollWidth, d.clientWidth, t ? t.offsetWidth : 0, heading(d).slice(0, 60)];
  });
  const e = document.documentElement;
  document.body.setAttribute('data-widths', JSON.stringify({tables: rows, doc: [e.scrollWidth, e.clientWidth]}));
});
</script>"""


def measure(index: Path, window: int = 1400, chromium: str = "chromium") -> dict:
    """{'tables': [[i, scrollWidth, clientWidth, table width, heading], ...], 'doc': [scrollWidth, clientWidth]},
    with every <details> opened first."""
    page = index.read_text(encoding="utf-8")
    probe = index.with_name("measure.html")  # beside index.html, so the relative image links resolve
    probe.write_text(page.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    try:
        dom = subprocess.run(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={window},1000",
             "--virtual-time-budget=3000", "--dump-dom", probe.resolve().as_uri()],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout
    finally:
        probe.unlink(missing_ok=True)
    m = re.search(r"data-widths=\"([^\"]*)\"", dom)
    if not m:
        raise RuntimeError("the probe wrote no data-widths attribute (did the page load?)")
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("index", type=Path, help="a report's index.html")
    ap.add_argument("--window", type=int, default=1400, help="window width in px (default 1400)")
    a = ap.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("report_width: skipped: no chromium on the PATH")
        return 0
    r = measure(a.index, a.window, chromium)
    over = [t for t in r["tables"] if t[1] > t[2]]
    for i, sw, cw, tw, head in r["tables"]:
        verdict = "SCROLLS" if sw > cw else "fits   "
        print(f"box {i:2d}  scroll {sw:5d} / client {cw:5d} px (table {tw:5d})  {verdict}  {head}")
    doc_sw, doc_cw = r["doc"]
    print(f"document {doc_sw} / {doc_cw} px  {'SCROLLS' if doc_sw > doc_cw else 'fits'}")
    print(json.dumps({"window": a.window, "tables": r["tables"], "doc": r["doc"], "n_scrolling": len(over)}))
    return 1 if over or doc_sw > doc_cw else 0


if __name__ == "__main__":
    sys.exit(main())
