"""scripts/bootstrap.sh picks the torch build a user expects, and pip does what its choice relies on.

The choice is printed by ``bash scripts/bootstrap.sh --print-torch-spec`` (nothing is installed).
PyTorch's CPU index and PyPI are stood in for by local indexes of empty wheels with the real file
names (``torch-2.13.0+cpu-...`` for the CPU build, ``torch-2.13.0-...`` for PyPI's CUDA build), and
pip only resolves (``--dry-run``), so nothing is downloaded.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"
PLATFORM = "manylinux_2_28_x86_64"
pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or os.uname().machine != "x86_64", reason="the wheel tags here are Linux x86_64's"
)


def _index(root: Path, versions: list[str], tag: str = TAG) -> Path:
    """A PEP 503 index at ``root`` holding empty torch wheels of ``versions`` for Python ``tag``."""
    (root / "torch").mkdir(parents=True)
    links = []
    for v in versions:
        name = f"torch-{v}-{tag}-{tag}-{PLATFORM}.whl"
        with zipfile.ZipFile(root / "torch" / name, "w") as z:
            info = f"torch-{v}.dist-info"
            z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {v}\n")
            z.writestr(
                f"{info}/WHEEL",
                f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: {tag}-{tag}-{PLATFORM}\n",
            )
            z.writestr(f"{info}/RECORD", "")
        links.append(f'<a href="{name}">{name}</a>')
    (root / "torch" / "index.html").write_text("<html><body>" + "\n".join(links) + "</body></html>")
    return root


class _Server:
    """An HTTP server on 127.0.0.1 serving ``directory``; remembers the paths it was asked for."""

    def __init__(self, directory: Path) -> None:
        requests = self.requests = []

        class Handler(SimpleHTTPRequestHandler):
            def send_head(self):
                requests.append(self.path)
                return super().send_head()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def cpu_index(tmp_path):
    server = _Server(_index(tmp_path / "cpu", ["2.13.0+cpu"]))
    yield server
    server.close()


@pytest.fixture
def pypi(tmp_path):
    """PyPI as pip sees it for torch on Linux x86_64: the CUDA builds, without a local version."""
    return _index(tmp_path / "pypi", ["2.13.0", "2.14.1"]).as_uri()


def _spec(env: dict[str, str], tmp_path: Path) -> tuple[str, str, float]:
    """(stdout, stderr, seconds) of ``bootstrap.sh --print-torch-spec`` with ``env`` added."""
    bin_dir = tmp_path / "bin"  # PATH without any nvidia-smi unless a test puts one here
    bin_dir.mkdir(exist_ok=True)
    base = {k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "TORCH_VERSION", "TORCH_CPU_INDEX")}
    base["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    base["PYTHON"] = sys.executable
    t = time.monotonic()
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "bootstrap.sh"), "--print-torch-spec"],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip(), r.stderr.strip(), time.monotonic() - t


def _pip_picks(args: list[str], extra_index: str | None = None) -> str:
    """The torch wheel ``pip install ARGS`` would install (resolution only), in a pip that reads no
    configuration but ``extra_index`` as a configured extra index (as a user's pip.conf would)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    if extra_index:
        env["PIP_EXTRA_INDEX_URL"] = extra_index
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet"]
    r = subprocess.run(
        [*cmd, "--report", "-", *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if r.returncode != 0:
        return "error: " + r.stderr.strip().splitlines()[-1]
    (item,) = json.loads(r.stdout)["install"]
    return item["download_info"]["url"].rsplit("/", 1)[1].replace("%2B", "+")


def _no_gpu_here() -> None:
    if Path("/proc/driver/nvidia/version").exists():
        pytest.skip("this machine has an NVIDIA driver: the bootstrap rightly keeps the default")


@pytest.mark.slow
def test_without_a_gpu_the_cpu_index_is_used_and_pip_takes_its_cpu_wheel(cpu_index, pypi, tmp_path):
    _no_gpu_here()
    out, err, _ = _spec({"TORCH_CPU_INDEX": cpu_index.url}, tmp_path)
    assert out == f"torch==2.13.0 --index-url {cpu_index.url}"
    assert "CPU build" in err
    assert cpu_index.requests == ["/torch/"]  # the probe: one HEAD request
    # pip, given these arguments and PyPI as a configured extra index, takes the CPU wheel.
    assert _pip_picks(out.split(), extra_index=pypi) == f"torch-2.13.0+cpu-{TAG}-{TAG}-{PLATFORM}.whl"


@pytest.mark.slow
def test_what_the_default_installs_from_pypi(pypi, tmp_path):
    """Without the CPU index (unreachable here) the default is PyPI's build: the CUDA one."""
    out, err, _ = _spec({"TORCH_CPU_INDEX": "http://127.0.0.1:9/"}, tmp_path)  # port 9: nothing listens
    assert out == "torch==2.13.0"
    assert "did not answer" in err and "CUDA build" in err
    assert _pip_picks(["--index-url", pypi, *out.split()]) == f"torch-2.13.0-{TAG}-{TAG}-{PLATFORM}.whl"


@pytest.mark.slow
def test_why_index_url_and_not_extra_index_url(cpu_index, pypi, tmp_path):
    """With the CPU index only *extra*, pip takes the newest match from either index: an exact
    pin takes the CPU wheel (2.13.0+cpu sorts above 2.13.0), but a range, or a Python the CPU index
    has no wheel for, silently takes PyPI's CUDA build; as the only index, a missing wheel fails."""
    extra = ["--index-url", pypi, "--extra-index-url", cpu_index.url]
    assert _pip_picks([*extra, "torch==2.13.0"]).startswith("torch-2.13.0+cpu-")
    assert _pip_picks([*extra, "torch>=2.9"]).startswith("torch-2.14.1-")
    other_python = _Server(_index(tmp_path / "cpu-other", ["2.13.0+cpu"], tag="cp399"))
    try:
        other = ["--index-url", pypi, "--extra-index-url", other_python.url, "torch==2.13.0"]
        assert _pip_picks(other).startswith("torch-2.13.0-")
        assert _pip_picks(["--index-url", other_python.url, "torch==2.13.0"]).startswith("error:")
    finally:
        other_python.close()


@pytest.mark.slow
def test_with_an_nvidia_gpu_the_default_is_kept_without_probing(cpu_index, tmp_path):
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    smi.chmod(0o755)
    out, err, _ = _spec({"TORCH_CPU_INDEX": cpu_index.url}, tmp_path)
    assert out == "torch==2.13.0" and "NVIDIA GPU found" in err
    assert cpu_index.requests == []


@pytest.mark.slow
def test_an_index_that_never_answers_costs_seconds_not_minutes(tmp_path):
    _no_gpu_here()
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        out, _, seconds = _spec({"TORCH_CPU_INDEX": f"http://127.0.0.1:{silent.getsockname()[1]}/"}, tmp_path)
    finally:
        silent.close()
    assert out == "torch==2.13.0"
    assert seconds < 8, seconds


@pytest.mark.slow
def test_torch_spec_and_torch_version_override(cpu_index, tmp_path):
    _no_gpu_here()
    spec = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
    out, _, _ = _spec({"TORCH_SPEC": spec, "TORCH_CPU_INDEX": cpu_index.url}, tmp_path)
    assert out == spec and cpu_index.requests == []
    out, _, _ = _spec({"TORCH_VERSION": "2.14.1", "TORCH_CPU_INDEX": cpu_index.url}, tmp_path)
    assert out == f"torch==2.14.1 --index-url {cpu_index.url}"
