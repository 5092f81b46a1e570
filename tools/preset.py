"""Apply a preset: a small file in presets/ holding the params it changes, as `dvc exp run -S key=value` pairs.

    python tools/preset.py airnet-fast                      # dvc exp run -S ... (one experiment, in the workspace)
    python tools/preset.py airnet-fast -S train.seed=1      # more dvc exp run arguments after the name
    python tools/preset.py fc --queue                       # queue it instead (dvc queue start runs the queue)
    python tools/preset.py --list                           # the presets and what each one is
    python tools/preset.py --print seed                     # the dvc command, without running it

Going through `dvc exp run -S` keeps DVC's conventions: DVC writes the values into params.yaml (its comments
stay), records the experiment, and `dvc params diff` and `dvc exp show` show them. A later -S for the same key
wins, so arguments after the preset's name override it. The preset is checked against params.yaml (every key must
exist, and the result must pass the params check) before DVC runs anything.

A preset file is a comment header (its first line is the description that --list prints) and a mapping shaped
like params.yaml holding only the keys it changes."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = REPO_ROOT / "presets"
PARAMS_YAML = REPO_ROOT / "params.yaml"
sys.path.insert(0, str(REPO_ROOT))

from stages.base.config import set_dotted, validate  # noqa: E402
from stages.base.runtime import ParamsError, brief  # noqa: E402
from stages.base.yamlfile import read_yaml  # noqa: E402

# Text that may go into -S unquoted (no sweep commas, list brackets or quotes), if YAML reads it as that text too.
PLAIN_TEXT = re.compile(r"[A-Za-z_/][\w./%+-]*|\d[\w.]*%")
# A preset is named by its file's stem in presets/: never a path (it must not apply a file from elsewhere).
PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class PresetError(Exception):
    pass


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def preset_file(name: str) -> Path:
    if not PRESET_NAME.fullmatch(name) or name.endswith(".yaml"):
        raise PresetError(f"{brief(name)} is not a preset name: give the name of a file in presets/ without "
                          f".yaml (letters, digits, '.', '_', '-'); presets: {', '.join(preset_names())}")
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise PresetError(f"no preset {name!r} ({path.relative_to(REPO_ROOT)} does not exist); "
                          f"presets: {', '.join(preset_names())}")
    return path


def description(name: str) -> str:
    """The first line of the preset's comment header."""
    first = preset_file(name).read_text(encoding="utf-8").splitlines()[0]
    return first.removeprefix("#").strip() if first.startswith("#") else ""


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"airnet": {"widths": [48]}}} -> {"train.airnet.widths": [48]}: params.yaml's sections are
    the only mappings in it, so every mapping is a section and everything else a value."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_preset(name: str) -> dict[str, Any]:
    """The preset's params as {dotted key: value}, in the file's order."""
    path = preset_file(name)
    try:
        content = read_yaml(path, "a preset", shown_as=path.relative_to(REPO_ROOT))
    except ParamsError as error:
        raise PresetError(str(error)) from None
    if not isinstance(content, dict) or not content:
        raise PresetError(f"{path.relative_to(REPO_ROOT)}: expected a mapping shaped like params.yaml")
    return flatten(content)


def check_preset(name: str, params_file: Path = PARAMS_YAML) -> dict[str, Any]:
    """The preset applied to `params_file`, as DVC would write it; a key params.yaml lacks or a value the params
    check refuses is a PresetError naming the preset file."""
    where = preset_file(name).relative_to(REPO_ROOT)
    try:
        params = read_yaml(params_file, "the pipeline's params")
        for dotted, value in read_preset(name).items():
            set_dotted(params, dotted, value)
        return validate(params)
    except ParamsError as error:
        raise PresetError(f"{where}: {error}") from None


def override_value(value: Any) -> str:
    """A value as `-S key=value` text (DVC reads it with Hydra's override grammar and writes it into params.yaml)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(override_value(item) for item in value) + "]"
    if isinstance(value, str):
        plain = PLAIN_TEXT.fullmatch(value) and yaml.safe_load(value) == value and value.lower() not in ("inf", "nan")
        return value if plain else "'" + value.replace("'", "\\'") + "'"
    raise PresetError(f"{value!r}: a preset value must be a number, text, true/false, null or a list")


def override_args(name: str) -> list[str]:
    args = []
    for dotted, value in read_preset(name).items():
        text = override_value(value)
        # DVC writes floats such as 1e-05 in a form that YAML reads back as text: refuse what would not survive
        if not isinstance(value, str) and yaml.safe_load(text) != value:
            raise PresetError(f"{preset_file(name).relative_to(REPO_ROOT)}: {dotted}: {value!r} does not survive "
                              f"dvc exp run -S (it would reach params.yaml as {text}); write it another way")
        args += ["-S", f"{dotted}={text}"]
    return args


def dvc_executable() -> tuple[str, dict[str, str]]:
    """The dvc beside this interpreter (a venv's) with that folder first on PATH, so that the stages' `python -m
    stages.<name>` commands run on the same Python; else dvc from PATH."""
    bin_dir = Path(sys.executable).parent  # not resolved: a venv's python is a link out of the venv
    beside = bin_dir / ("dvc.exe" if os.name == "nt" else "dvc")
    env = dict(os.environ)
    if beside.exists():
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return str(beside), env
    found = shutil.which("dvc")
    if found is None:
        raise PresetError("dvc not found beside this Python or on PATH; install the project: make install")
    return found, env


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the presets with their descriptions")
    parser.add_argument("--print", action="store_true", help="print the dvc command instead of running it")
    parser.add_argument("name", nargs="?", help="a preset: the name of a file in presets/ without .yaml")
    parser.add_argument("dvc_args", nargs=argparse.REMAINDER, help="more `dvc exp run` arguments")
    args = parser.parse_args(argv)
    if not args.list and args.name is None:
        parser.error(f"name a preset ({', '.join(preset_names())}) or give --list")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.list:
            width = max(map(len, preset_names()), default=0)
            for name in preset_names():
                print(f"{name:<{width}}  {description(name)}")
            return 0
        check_preset(args.name)
        command = ["exp", "run", *override_args(args.name), *args.dvc_args]
        if args.print:
            print(shlex.join(["dvc", *command]))
            return 0
        dvc, env = dvc_executable()
    except PresetError as error:
        print(f"preset: {error}", file=sys.stderr)
        return 2
    return subprocess.call([dvc, *command], cwd=REPO_ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
