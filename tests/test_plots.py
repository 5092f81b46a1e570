"""`dvc plots show` / `dvc plots diff` pages that draw with no network.

DVC's own page loads Vega from a CDN; .dvc/config points DVC at plots/template.html instead, which inlines the
builds pinned in plots/build_template.py. The checks: the template holds exactly those builds, the page DVC writes
from it references nothing on the network, and, when Chromium is installed, a headless Chromium with every host
name unresolvable opens the page from disk and draws every plot with no console error.
"""

from __future__ import annotations

import configparser
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from PIL import Image

from pipeline_repo import Baseline, PipelineRepo
from repo_root import REPO_ROOT

PLOTS_DIR = REPO_ROOT / "plots"
# The inline blocks build_template.py writes: <script data-vendored="pkg@ver" data-sha256="...">\n(source)</script>
VENDORED_BLOCK = re.compile(r'<script data-vendored="([^"]+)" data-sha256="([0-9a-f]{64})">\n(.*?)</script>\n',
                            re.DOTALL)
# DVC's plot element (dvc_render VegaRenderer.DIV): one vegaEmbed('#<id>', spec) call per plot.
EMBED_CALL = re.compile(r"vegaEmbed\('#([^']+)'")
# A console line Chromium logs for an uncaught exception, a failed load or console.error (Vega logs "ERROR ...").
CONSOLE_PROBLEM = re.compile(r"Uncaught|net::ERR_|Failed to load|\"ERROR ", re.IGNORECASE)
CHROMIUM_TIMEOUT_S = 120


@functools.cache
def load_builder() -> ModuleType:
    """plots/build_template.py as a module (plots/ is a folder of vendored files, not a package)."""
    spec = importlib.util.spec_from_file_location("build_template", PLOTS_DIR / "build_template.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def plot_count() -> int:
    return len(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["plots"])


# ---------------------------------------------------------------- the template itself


def test_template_inlines_exactly_the_pinned_builds_and_is_up_to_date() -> None:
    builder = load_builder()
    template = (PLOTS_DIR / "template.html").read_text(encoding="utf-8")
    blocks = VENDORED_BLOCK.findall(template)
    assert [(spec, digest) for spec, digest, _ in blocks] == [(s.spec, s.sha256) for s in builder.VENDORED]
    for spec, digest, source in blocks:
        assert hashlib.sha256(source.encode("utf-8")).hexdigest() == digest, f"{spec} differs from its npm build"
    # Regenerating from the same sources gives the same bytes: the file is the builder's output, unedited.
    sources = {script.package: source for script, (_, _, source) in zip(builder.VENDORED, blocks)}
    assert builder.render_template(sources) == template


def test_template_has_dvc_placeholders_but_no_cdn_scripts_slot() -> None:
    template = (PLOTS_DIR / "template.html").read_text(encoding="utf-8")
    assert template.count("{plot_divs}") == 1 and template.count("{refresh_tag}") == 1
    # DVC puts its CDN <script> tags where the template says {scripts}; this one must not say it.
    assert "{scripts}" not in template


def test_every_vendored_build_has_its_licence() -> None:
    for script in load_builder().VENDORED:
        licence = (PLOTS_DIR / "licenses" / f"{script.package}.LICENSE").read_text(encoding="utf-8")
        assert script.spec in licence and "Redistribution and use in source and binary forms" in licence


def test_dvc_config_points_plots_at_the_template() -> None:
    config = configparser.ConfigParser(inline_comment_prefixes=("#",))
    config.read(REPO_ROOT / ".dvc" / "config", encoding="utf-8")
    configured = config["plots"]["html_template"]
    assert (REPO_ROOT / ".dvc" / configured).resolve() == (PLOTS_DIR / "template.html").resolve()


def test_builder_refuses_a_build_that_would_break_the_page() -> None:
    builder = load_builder()
    with pytest.raises(builder.PipelineError, match="cannot be inlined"):
        builder.script_block(builder.VENDORED[0], 'var x = "</script>";')


# ---------------------------------------------------------------- the page DVC writes from it


class ExternalReferences(HTMLParser):
    """Every script src and link href in a page that points at the network."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href", "img": "src", "iframe": "src"}.get(tag)
        for name, value in attrs:
            if name == wanted and value and re.match(r"\s*(https?:)?//", value, re.IGNORECASE):
                self.found.append(f"<{tag} {name}={value}>")


@pytest.fixture(scope="module")
def plots_repo(baseline: Baseline, tmp_path_factory: pytest.TempPathFactory) -> PipelineRepo:
    """A copy of the finished baseline run with `dvc plots show` and `dvc plots diff HEAD` pages written."""
    repo = baseline.repo.copy_to(tmp_path_factory.mktemp("plots") / "repo")
    repo.dvc("plots", "show")
    repo.dvc("plots", "diff", "HEAD", "--out", "plots_diff")
    return repo


PAGES = ("dvc_plots/index.html", "plots_diff/index.html")


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_plots_page_loads_nothing_from_the_network(plots_repo: PipelineRepo, page: str) -> None:
    html = (plots_repo.path / page).read_text(encoding="utf-8")
    parser = ExternalReferences()
    parser.feed(html)
    assert not parser.found, f"{page} loads from the network: {parser.found}"
    assert "cdn.jsdelivr.net" not in html
    assert [spec for spec, _, _ in VENDORED_BLOCK.findall(html)] == [s.spec for s in load_builder().VENDORED]
    assert len(set(EMBED_CALL.findall(html))) == plot_count()


# ---------------------------------------------------------------- drawn by a real browser


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")  # Debian, Ubuntu, GitHub's runners


def chromium() -> str | None:
    """A Chromium-based browser: $CHROMIUM if set, else the first of BROWSERS on PATH (GitHub's ubuntu-latest
    runners have Google Chrome, so the workflow runs these tests too)."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def run_chromium(page: Path, profile: Path, *mode: str) -> subprocess.CompletedProcess:
    """Headless Chromium on a page from disk; every host name fails to resolve, so nothing can come from the
    network. The virtual time budget lets the page's scripts finish before the DOM or screenshot is taken."""
    browser = chromium()
    assert browser is not None
    command = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
               "--disable-background-networking", "--host-resolver-rules=MAP * ~NOTFOUND",
               f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--window-size=1200,2400",
               "--enable-logging=stderr", "--v=0", *mode, page.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"chromium exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done


class DrawnPlots(HTMLParser):
    """In a rendered DOM: the ids of the vega-embed containers that hold a drawn chart (a canvas or svg with
    class "marks" and a non-zero size). Plots follow one another, so a chart belongs to the last container opened
    before it (no nesting to track, which void tags such as the charts' <input> sliders would upset)."""

    def __init__(self) -> None:
        super().__init__()
        self.current_embed: str | None = None
        self.drawn: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if tag == "div" and "vega-embed" in classes:
            self.current_embed = attributes.get("id") or ""
        elif tag in ("canvas", "svg") and "marks" in classes and self.current_embed is not None:
            if float(attributes.get("width") or 0) > 0 and float(attributes.get("height") or 0) > 0:
                self.drawn.add(self.current_embed)


def non_white_fraction(screenshot: Path) -> float:
    with Image.open(screenshot) as image:
        grey = image.convert("L")
        histogram = grey.histogram()
    return 1.0 - sum(histogram[250:]) / (grey.width * grey.height)


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
@pytest.mark.parametrize("page", PAGES)
def test_chromium_draws_every_plot_offline(plots_repo: PipelineRepo, page: str, tmp_path: Path) -> None:
    page_path = plots_repo.path / page
    expected = set(EMBED_CALL.findall(page_path.read_text(encoding="utf-8")))
    rendered = run_chromium(page_path, tmp_path / "profile-dom", "--dump-dom")
    drawn = DrawnPlots()
    drawn.feed(rendered.stdout)
    assert drawn.drawn == expected, f"plots not drawn: {sorted(expected - drawn.drawn)}"
    problems = [line for line in rendered.stderr.splitlines() if "CONSOLE" in line and CONSOLE_PROBLEM.search(line)]
    assert not problems, "console errors:\n" + "\n".join(problems)

    screenshot = tmp_path / "page.png"
    run_chromium(page_path, tmp_path / "profile-shot", f"--screenshot={screenshot}")
    assert non_white_fraction(screenshot) > 0.02, "the screenshot is (nearly) blank"
