"""``moelab.laws.report_section.laws_section``: the report's "Fitted scaling laws" section. On a synthetic study
from a known Abnar et al. law it must show every law's fit or its reason, write one figure per fitted law, keep
every table within 8 columns (the page fits 1400 px), flag extrapolated budgets and be balanced HTML."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_laws_study import FAMILY, TASK, study_table

from moelab.laws.report_section import laws_section, render_section
from moelab.laws.study import fit_study

BALANCED = ("section", "table", "thead", "tbody", "tr", "td", "th", "details", "summary", "figure", "ul", "p")


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.bad: list[str] = []
        self.imgs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        if tag in BALANCED:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in BALANCED and (not self.stack or self.stack.pop() != tag):
            self.bad.append(tag)


def _check_html(text: str) -> _Tags:
    p = _Tags()
    p.feed(text)
    assert not p.bad and not p.stack, (p.bad, p.stack)
    for head in re.findall(r"<thead>(.*?)</thead>", text):
        assert head.count("<th>") <= 8, head
    for row in re.findall(r"<tr>(.*?)</tr>", text):
        assert row.count("<td>") <= 8, row
    return p


@pytest.fixture(scope="module")
def table():
    """36 runs (4 (E, k) × 3 sizes × 3 token budgets), plus a two-step family that the table cannot support (one
    task loss value)."""
    df = study_table(sizes=3, budgets=3)
    df[f"bpt.{TASK}"], df[f"err.{FAMILY}"] = 1.0, 0.5
    df.attrs[f"tasks.{FAMILY}"] = [TASK]
    return df


def test_section_shows_every_law_or_its_reason_with_figures(table, tmp_path):
    """Ludziejewski et al.'s law is left out of the fit to keep the test under 30 s (it is 2/3 of the fitting time);
    the demo test below runs laws_section itself with every law."""
    study = fit_study(table, laws=("chinchilla", "abnar", "compute", "ladder"), n_boot=4, seed=0)
    text = render_section(study, tmp_path, n_boot=4, seed=0)
    assert text.startswith("<section") and text.endswith("</section>") and "Fitted scaling laws" in text
    tags = _check_html(text)
    fitted = [r for r in study.results if r.supported]
    assert {r.law for r in fitted} >= {"chinchilla", "abnar"}
    abnar = study.get("val_loss", "abnar").fit.params
    assert f"alpha = {abnar['alpha']:.4g} [" in text  # the fitted parameters with their interval
    assert len(tags.imgs) == len(fitted) and all((tmp_path / src).stat().st_size > 10_000 for src in tags.imgs)
    for r in study.results:
        if not r.supported:
            assert f"<i>cannot support</i>: {r.reason.split(':')[0]}" in text, r.law
    assert f"err.{FAMILY}" in text and "the accuracy sigmoid" in text  # the family's reason, not a fit
    assert text.count("(extrapolated)") == len([r for r in fitted if r.law in ("chinchilla", "abnar")])
    assert "95 %" in text and "refits agree" in text and "<details>" in text


DEMO = Path("/tmp/fresh/demo_study")


@pytest.mark.skipif(not DEMO.is_dir(), reason="demo study not present")
def test_demo_section_says_why_no_law_is_fitted(tmp_path):
    from moelab.analysis import build_table

    text = laws_section(build_table(DEMO), tmp_path, n_boot=5, seed=0)
    tags = _check_html(text)
    assert tags.imgs == [] and list(tmp_path.iterdir()) == []
    assert "only 1 token budget" in text and text.count("<i>cannot support</i>") == 8
    assert "No compute-optimal allocation" in text
