"""The rendered docs site, opened in a real browser (Debian chromium + playwright).

`make docs` (tools/docs.py) renders the notebooks with quarto into `_docs/`; this test builds it once, serves
it from a local HTTP server on 127.0.0.1 and checks what a reader sees: the landing page's set-up commands
and design paragraph, every module page's public names (methods included) each with its own entry and parameter table, `Loop` in
running text linked to its API page, the PPO tutorial's learning curve and video poster, the search box,
and no broken internal link anywhere. Screenshots of the landing page and the PPO tutorial are saved under
`tests/out/docs/`.

Skipped, with the reason, only where quarto can't be had (not on PATH, no `$QUARTO`, no `.cache/quarto`:
`make test` installs it there when the bundled installer is available) or chromium/playwright is missing.
"""

from __future__ import annotations

import configparser
import functools
import html
import html.parser
import http.server
import importlib
import inspect
import os
import re
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from _lab import CHROMIUM, launch_chromium

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "out" / "docs"
sys.path.insert(0, str(ROOT / "tools"))
from docs import find_quarto  # noqa: E402

_ini = configparser.ConfigParser()
_ini.read(ROOT / "settings.ini")
SITE = _ini["DEFAULT"]["doc_host"].rstrip("/") + _ini["DEFAULT"]["doc_baseurl"].rstrip("/") + "/"  # where it is published


def _local(link: str, base: str) -> str:
    "A link to the published site, as a link to the same page on the local server at `base`."
    return base.rstrip("/") + "/" + link[len(SITE):] if link.startswith(SITE) else link


pytestmark = [
    pytest.mark.skipif(find_quarto() is None, reason="quarto is not available (make docs says how to get it)"),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed (apt-get install -y chromium)"),
]


class _Links(html.parser.HTMLParser):
    "Collects hrefs/srcs and element ids of one page."

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        for k in ("href", "src"):
            if a.get(k) and tag in ("a", "img", "link", "script", "source", "video"):
                self.links.append(a[k])


def _parse(path: Path) -> _Links:
    p = _Links()
    p.feed(path.read_text(errors="replace"))
    return p


@pytest.fixture(scope="module")
def site() -> Iterator[tuple[str, Path]]:
    "Build the site with `tools/docs.py` and serve `_docs/` on 127.0.0.1."
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    readme = (ROOT / "README.md").read_bytes()
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "docs.py")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert (ROOT / "README.md").read_bytes() == readme, "building the docs rewrote README.md"
    docs = ROOT / "_docs"
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(docs))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", docs
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def browser(site: tuple[str, Path]) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = launch_chromium(pw)
        try:
            yield b
        finally:
            b.close()


def _module_pages() -> dict[str, str]:
    "page name (as quarto names it) -> module, for every notebook that exports a module."
    out = {}
    for nb_path in sorted((ROOT / "nbs").glob("*.ipynb")):
        nb = nbformat.read(nb_path, as_version=4)
        for c in nb.cells:
            if c.cell_type == "code" and c.source.lstrip().startswith("#| default_exp"):
                module = "researchlab." + c.source.split("default_exp", 1)[1].split()[0]
                page = nb_path.stem.split("_", 1)[1] if nb_path.stem[:2].isdigit() else nb_path.stem
                out[page] = module
                break
    return out


def test_landing_page_shows_setup_and_design(site: tuple[str, Path], browser: object) -> None:
    url, _ = site
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{url}/index.html")
    body = page.locator("main").inner_text()
    assert "make demo" in body and "make test" in body, body[:2000]
    assert "The design in one paragraph" in body and "The Loop is the only place" in body.replace("**", ""), body[:3000]
    OUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUT / "landing.png"), full_page=False)
    # `Loop` in running text links to its API page
    link = page.locator("main a:has(code)", has_text="Loop").first
    href = link.get_attribute("href")
    assert href and href.split("#")[0].endswith("loop.html"), href
    page.goto(urllib.parse.urljoin(f"{url}/index.html", _local(href, url)))
    assert page.locator("main h2, main h3, main h4").filter(has_text="Loop").count() > 0
    page.close()


_SECTION = re.compile(r'<section id="[^"]*" class="level\d">\s*<h\d[^>]*>(.*?)</h\d>(.*?)(?=<section |</section>|<hr|<div id="[^"]*" class="cell)',
                      re.S)


def _entries(text: str) -> dict[str, bool]:
    "Each heading of a page -> whether the entry under it (up to the first cell, rule or section) has a parameter table."
    out: dict[str, bool] = {}
    for title, body in _SECTION.findall(text):
        name = html.unescape(re.sub(r"<[^>]+>", "", title)).strip()
        table = bool(re.search(r"<table.*?<th>\s*(<strong>)?Details(</strong>)?\s*</th>", body, re.S))
        out[name] = out.get(name, False) or table
    return out


def _takes_parameters(obj: object) -> bool:
    "Whether `obj`'s signature has a named parameter (`self`, `cls`, `*args` and `**kwargs` aside)."
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def _api(module: str) -> Iterator[tuple[str, object]]:
    """The public callables `module` defines, as their entries are titled: the names of its `__all__` and the public
    methods its classes define (an override is documented with the base class that declares it)."""
    mod = importlib.import_module(module)
    for public in getattr(mod, "__all__", []):
        obj = getattr(mod, public)
        if not callable(obj) or getattr(obj, "__module__", module) != module:
            continue  # constants, TypeVars and re-exports are documented where they are defined
        yield public, obj
        if not inspect.isclass(obj):
            continue
        for attr, raw in vars(obj).items():
            fn = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
            if attr.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != module:
                continue
            if any(attr in vars(base) for base in obj.__mro__[1:]) or attr in ("tree_flatten", "tree_unflatten"):
                continue  # overrides, and JAX's PyTree protocol, which JAX calls and a reader doesn't
            yield f"{public}.{attr}", getattr(obj, attr)


def test_every_module_page_lists_its_public_names(site: tuple[str, Path]) -> None:
    """Every public function and class, and every public method that takes parameters, has an entry on its module's
    page, and the entry of each one that takes parameters shows their table (Type, Default, Details), which
    `ParamTableRenderer` (settings.ini's `renderer`) builds from the docments."""
    _, docs = site
    pages = _module_pages()
    assert len(pages) >= 15, pages
    missing, no_table = [], []
    for name, module in pages.items():
        html_path = docs / f"{name}.html"
        assert html_path.exists(), f"no page for {module} ({html_path.name})"
        entries = _entries(html_path.read_text())
        for title, obj in _api(module):
            takes = _takes_parameters(obj)
            if title not in entries and (takes or "." not in title):  # a method without parameters may go unlisted
                missing.append(f"{name}.html: {title}")
            elif takes and not entries[title]:
                no_table.append(f"{name}.html: {title}")
    assert not missing, f"public names without an entry on their module page (add a show_doc cell): {missing}"
    assert not no_table, f"entries without a parameter table (give each parameter a docment): {no_table}"


def test_ppo_tutorial_shows_curve_and_video_poster(site: tuple[str, Path], browser: object) -> None:
    url, docs = site
    page_path = docs / "tutorials" / "ppo_cartpole.html"
    assert page_path.exists()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{url}/tutorials/ppo_cartpole.html")
    imgs = page.locator("main img")
    assert imgs.count() >= 2, "the PPO tutorial shows no learning curve and video poster"
    widths = page.evaluate("() => Array.from(document.querySelectorAll('main img')).map(i => i.naturalWidth)")
    assert sum(w > 100 for w in widths) >= 2, widths  # both images decode
    alts = " ".join(filter(None, [imgs.nth(i).get_attribute("alt") or "" for i in range(imgs.count())]))
    srcs = " ".join(imgs.nth(i).get_attribute("src") or "" for i in range(imgs.count()))
    assert ".gif" in srcs or "image/gif" in srcs or "poster" in alts.lower(), (srcs[:300], alts)
    OUT.mkdir(parents=True, exist_ok=True)
    page.locator("main img").first.scroll_into_view_if_needed()
    page.screenshot(path=str(OUT / "ppo_tutorial.png"), full_page=False)
    page.close()


def test_search_finds_fieldselector(site: tuple[str, Path], browser: object) -> None:
    url, _ = site
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{url}/index.html")
    page.locator("#quarto-search .aa-DetachedSearchButton, #quarto-search button, #quarto-search input").first.click()
    box = page.locator("input.aa-Input")
    box.fill("FieldSelector")
    results = page.locator(".aa-Item")
    results.first.wait_for(timeout=15_000)
    assert "FieldSelector" in page.locator(".aa-Panel, .aa-DetachedContainer").first.inner_text()
    page.close()


def test_no_broken_internal_links(site: tuple[str, Path]) -> None:
    _, docs = site
    pages = sorted(docs.rglob("*.html"))
    parsed = {p: _parse(p) for p in pages}
    broken = []
    for p, links in parsed.items():
        for link in links.links:
            if link.startswith(SITE):  # nbdev links names to their API pages on the published site
                link = os.path.relpath(docs / link[len(SITE):].split("#")[0], p.parent) + (
                    "#" + link.split("#", 1)[1] if "#" in link else "")
            u = urllib.parse.urlsplit(link)
            if u.scheme or u.netloc or link.startswith(("mailto:", "data:", "javascript:")):
                continue
            target = (p.parent / urllib.parse.unquote(u.path)).resolve() if u.path else p
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{p.relative_to(docs)} -> {link}")
            elif u.fragment and target.suffix == ".html" and target in parsed:
                if u.fragment not in parsed[target].ids and not u.fragment.startswith(("cb", "fn")):
                    broken.append(f"{p.relative_to(docs)} -> {link} (no such anchor)")
    assert not broken, "broken internal links:\n" + "\n".join(broken[:40])
