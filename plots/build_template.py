"""Rebuild plots/template.html, the page `dvc plots show` / `dvc plots diff` fill (.dvc/config: plots.html_template).

DVC's own page loads Vega, Vega-Lite and Vega-Embed from a CDN, so it draws nothing offline. This template inlines
the three minified builds instead, taken from their npm packages (`npm pack`, checked against the pinned sha256),
so the page works from any folder it is written to and with no network. The licences go to plots/licenses/.

    python plots/build_template.py     # needs npm and the npm registry; the result is byte-identical each time
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

PLOTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = PLOTS_DIR.parent
TEMPLATE = PLOTS_DIR / "template.html"
LICENSES_DIR = PLOTS_DIR / "licenses"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from stages.base.runtime import PipelineError, run_stage, write_text  # noqa: E402


@dataclass(frozen=True)
class VendoredScript:
    package: str
    version: str
    build_file: str  # path inside the npm tarball
    sha256: str  # of build_file, as published on npm
    licence_package: str  # the npm package@version whose LICENSE covers it

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"


# The majors DVC 3.67.1's own page loads (vega@5, vega-lite@5, vega-embed@6: dvc_render/vega.py), at their latest
# releases; vega-embed 6.29 needs vega ^5.21, vega-lite 5.23 needs vega ^5.24. Load order matters: each build
# reads the previous one from the global scope.
VENDORED: tuple[VendoredScript, ...] = (
    VendoredScript("vega", "5.33.1", "package/build/vega.min.js",
                   "463f3db6a40b20e9747b4ed38f37ed0add508838f9141b1cf8366784b07b30c8",
                   # the vega package ships no LICENSE file; vega-view, from the same repository, ships its licence
                   licence_package="vega-view@5.16.1"),
    VendoredScript("vega-lite", "5.23.0", "package/build/vega-lite.min.js",
                   "58c27358e26f2d319cf62f45bc17a4c8362f08645001df2ec8d341eee4097c7f",
                   licence_package="vega-lite@5.23.0"),
    VendoredScript("vega-embed", "6.29.0", "package/build/vega-embed.min.js",
                   "12d02acfbe3ec59ef9a37dd4822a2e04e2961b5bbb671bbe661d2221715b99da",
                   licence_package="vega-embed@6.29.0"),
)

# DVC fills these; a vendored script that contained one (or a closing script tag) would break the page.
DVC_PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")

# No scripts placeholder on purpose: DVC would put its CDN <script> tags there.
PAGE_HEAD = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC Plot</title>
<style>
body { font-family: sans-serif; }
table { border-spacing: 15px; }
</style>
"""

PAGE_TAIL = """</head>
<body>
{plot_divs}
</body>
</html>
"""


def script_block(script: VendoredScript, source: str) -> str:
    """One inline <script>, marked with what it is so tests and readers can find and check it."""
    # DVC reads the template as text (universal newlines), so a carriage return would not reach the page as is.
    if "</script" in source.lower() or "\r" in source or any(p in source for p in DVC_PLACEHOLDERS):
        raise PipelineError(f"{script.spec}: {script.build_file} cannot be inlined (it holds a closing script "
                            "tag, a carriage return or a DVC placeholder)")
    # The source goes in byte for byte (its own final newline included), so the block hashes to the npm file.
    return f'<script data-vendored="{script.spec}" data-sha256="{script.sha256}">\n{source}</script>\n'


def render_template(sources: dict[str, str]) -> str:
    """The whole template from each VENDORED script's source text (keyed by package)."""
    blocks = "".join(script_block(script, sources[script.package]) for script in VENDORED)
    return PAGE_HEAD + blocks + PAGE_TAIL


def npm_pack(spec: str, workdir: Path) -> tarfile.TarFile:
    """Download one package's tarball from the npm registry, the same file `npm install` would unpack."""
    try:
        done = subprocess.run(["npm", "pack", spec, "--silent", "--pack-destination", str(workdir)],
                              check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise PipelineError("npm not found: install Node.js and npm to rebuild plots/template.html") from None
    except subprocess.CalledProcessError as error:
        raise PipelineError(f"npm pack {spec} failed: {error.stderr.strip()}") from None
    tarball = workdir / done.stdout.strip().splitlines()[-1]
    return tarfile.open(tarball, "r:gz")


def read_member(archive: tarfile.TarFile, member: str, spec: str) -> bytes:
    try:
        extracted = archive.extractfile(member)
    except KeyError:
        extracted = None
    if extracted is None:
        raise PipelineError(f"{spec}: the npm package has no {member}")
    return extracted.read()


def fetch_script(script: VendoredScript, workdir: Path) -> str:
    with npm_pack(script.spec, workdir) as archive:
        data = read_member(archive, script.build_file, script.spec)
    digest = hashlib.sha256(data).hexdigest()
    if digest != script.sha256:
        raise PipelineError(f"{script.spec}: {script.build_file} has sha256 {digest}, pinned {script.sha256}")
    return data.decode("utf-8")


def fetch_licence(script: VendoredScript, workdir: Path) -> str:
    with npm_pack(script.licence_package, workdir) as archive:
        return read_member(archive, "package/LICENSE", script.licence_package).decode("utf-8")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="npm-vendor-") as workdir:
        sources = {script.package: fetch_script(script, Path(workdir)) for script in VENDORED}
        licences = {script.package: fetch_licence(script, Path(workdir)) for script in VENDORED}
    write_text(TEMPLATE, render_template(sources))
    LICENSES_DIR.mkdir(exist_ok=True)
    for script in VENDORED:
        header = f"{script.spec} ({script.build_file}), licence text from the npm package {script.licence_package}\n\n"
        write_text(LICENSES_DIR / f"{script.package}.LICENSE", header + licences[script.package])
    print(f"wrote {TEMPLATE.relative_to(REPO_ROOT)} ({TEMPLATE.stat().st_size} bytes) and "
          f"{LICENSES_DIR.relative_to(REPO_ROOT)}/")


if __name__ == "__main__":
    run_stage(main)
