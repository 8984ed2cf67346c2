"""docker/ without a Docker engine: both images install the way the README does (docs/training.md
shows the Docker commands), and every command they (and the compose file) run names an existing
script with arguments that script accepts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tp_ffn.train import parse_args

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
INSTALL = 'RUN bash -c "source scripts/bootstrap.sh"'


def _instructions(dockerfile: Path) -> list[str]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _exec_form(instructions: list[str], keyword: str) -> list[str]:
    (line,) = [ln for ln in instructions if ln.startswith(keyword + " ")]
    return json.loads(line[len(keyword) + 1 :])


def _check_torchrun_command(argv: list[str]) -> None:
    """``argv`` = torchrun's arguments: a script under scripts/ and arguments train.py accepts."""
    (i,) = [k for k, a in enumerate(argv) if a.startswith("scripts/")]
    launcher, script, args = argv[:i], argv[i], argv[i + 1 :]
    assert (ROOT / script).is_file(), script
    assert script == "scripts/train.py"
    nproc = int(launcher[launcher.index("--nproc_per_node") + 1])
    nnodes = int(launcher[launcher.index("--nnodes") + 1]) if "--nnodes" in launcher else 1
    cfg = parse_args(args)  # raises on a flag train.py does not have
    plan = cfg.plan(nproc * nnodes)
    cfg.check_model(cfg.model_config())
    assert plan.tp * plan.dp == nproc * nnodes


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_images_install_like_the_readme_and_run_train(name):
    ins = _instructions(DOCKER / name)
    assert [ln for ln in ins if ln.startswith("RUN") and "bootstrap" in ln] == [INSTALL]
    assert any(ln.startswith("ARG TORCH_SPEC=") for ln in ins) and "ENV TORCH_SPEC=${TORCH_SPEC}" in ins
    assert _exec_form(ins, "ENTRYPOINT") == ["torchrun"]
    _check_torchrun_command(_exec_form(ins, "CMD"))
    assert (DOCKER / f"{name}.dockerignore").read_text().count(".venv/") == 1


def test_cpu_and_cuda_images_differ_only_in_base_and_torch_build():
    cpu, cuda = (_instructions(DOCKER / n) for n in ("Dockerfile.cpu", "Dockerfile.cuda"))
    assert "download.pytorch.org/whl/cpu" in " ".join(cpu) and "download.pytorch.org/whl/cu" in " ".join(cuda)
    same = ("WORKDIR", "COPY", "RUN bash", "ENV TORCH_SPEC", "ENTRYPOINT")
    assert [ln for ln in cpu if ln.startswith(same)] == [ln for ln in cuda if ln.startswith(same)]


def test_images_install_the_bootstrap_release_from_one_index():
    """The images pin the release the bootstrap installs, each from one PyTorch index (``--index-url``:
    as an extra index, PyPI's CUDA build could win, see tests/project/test_bootstrap.py)."""
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    version = re.search(r'TORCH_VERSION="\$\{TORCH_VERSION:-([0-9.]+)\}"', bootstrap).group(1)
    for name, variant in (("Dockerfile.cpu", "cpu"), ("Dockerfile.cuda", "cu130")):
        (arg,) = [ln for ln in _instructions(DOCKER / name) if ln.startswith("ARG TORCH_SPEC=")]
        spec = arg.split("=", 1)[1].strip('"').split()
        assert spec == [f"torch=={version}", "--index-url", f"https://download.pytorch.org/whl/{variant}"], name


def test_compose_runs_two_nodes_over_its_network():
    text = (DOCKER / "compose.yaml").read_text()
    commands = [json.loads(m) for m in re.findall(r"^\s+command: (\[.*\])\s*$", text, flags=re.MULTILINE)]
    assert len(commands) == 2
    for rank, argv in enumerate(commands):
        _check_torchrun_command(argv)
        launcher = argv[: argv.index("scripts/train.py")]
        assert launcher[launcher.index("--nnodes") + 1] == "2"
        assert launcher[launcher.index("--node-rank") + 1] == str(rank)
        assert launcher[launcher.index("--rdzv-endpoint") + 1] == "node0:29500"
    assert commands[0][commands[0].index("scripts/train.py") :] == commands[1][commands[1].index("scripts/train.py") :]
    assert "dockerfile: docker/Dockerfile.cpu" in text and "context: .." in text
    assert re.search(r"^\s+- checkpoints:/ckpt$", text, flags=re.MULTILINE), (
        "both nodes need the same checkpoint volume"
    )


def test_docs_document_the_same_install_and_docker_commands():
    readme = (ROOT / "README.md").read_text()
    assert "source scripts/bootstrap.sh" in readme
    training = (ROOT / "docs" / "training.md").read_text()
    assert "source scripts/bootstrap.sh" in training  # the Docker section: the images install as the README does
    assert "docker build -f docker/Dockerfile.cpu" in training and "docker compose -f docker/compose.yaml up" in training
    run_sh = (ROOT / "scripts" / "run.sh").read_text()
    assert "source scripts/bootstrap.sh" in run_sh and "scripts/train.py" in run_sh and "scripts/sample.py" in run_sh
