"""The ``vitcache`` command: an operator's mistake ends in a line that says what to do, not a traceback
(``--log-level debug`` keeps it), and ``--help`` and ``stats`` import neither torch nor transformers.

The client-side commands run in subprocesses (what they import is the point); the ``serve`` mistakes
run ``cli.main`` in this process, which has torch and transformers loaded already, so each one fails
in well under a second instead of paying their import again.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from vitcache.server import cli

from .conftest import free_port, png_bytes

# The CLI's log format: "%(asctime)s %(levelname)s %(name)s: %(message)s" (the encoder process's too).
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")


def message_of(stderr: str) -> str:
    """What the command said on stderr besides log lines: one or two lines, no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert 1 <= len(lines) <= 2, stderr
    assert "Traceback" not in stderr, stderr
    return " ".join(lines)


def run_python(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120, check=False
    )


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vitcache.server.cli", *argv], capture_output=True, text=True, timeout=120, check=False
    )


def test_help_and_stats_import_neither_torch_nor_transformers():
    dead = f"http://127.0.0.1:{free_port()}"
    done = run_python(
        f"""
        import sys
        from vitcache.server.cli import main
        for command in ([], ["serve"], ["encode"], ["stats"], ["loadtest"]):
            try:
                main([*command, "--help"])
            except SystemExit:
                pass
        code = main(["stats", "--metrics-url", "{dead}"])
        print("RESULT", code, sorted(name for name in ("torch", "transformers") if name in sys.modules))
        """
    )
    assert done.stdout.splitlines()[-1] == "RESULT 2 []", done.stdout + done.stderr
    assert "--warmup-image-sizes" in done.stdout and "--zipf-exponent" in done.stdout  # every parser was built
    assert message_of(done.stderr).startswith(f"vitcache stats: cannot reach {dead}: [Errno 111] Connection refused")


def test_encode_and_loadtest_import_no_transformers(tmp_path: Path):
    """They use the client, whose embeddings are torch tensors: torch, but not transformers."""
    target = f"127.0.0.1:{free_port()}"
    done = run_python(
        f"""
        import sys
        from vitcache.server.cli import main
        codes = [
            main(["encode", "{tmp_path / "missing.png"}"]),
            main(["loadtest", "--target", "{target}", "--max-requests", "1", "--pool-size", "1", "--no-progress"]),
        ]
        print("RESULT", codes, "transformers" in sys.modules)
        """
    )
    assert done.stdout.splitlines()[-1] == "RESULT [2, 2] False", done.stdout + done.stderr
    missing, unreachable = done.stderr.splitlines()
    assert missing == f"vitcache encode: {tmp_path / 'missing.png'}: No such file or directory"
    assert unreachable.startswith(f"cannot reach {target}: UNAVAILABLE")


def test_debug_log_level_shows_the_traceback():
    dead = f"http://127.0.0.1:{free_port()}"
    quiet = run_cli("stats", "--metrics-url", dead)
    assert quiet.returncode == 2
    assert "cannot reach" in message_of(quiet.stderr)
    debug = run_cli("--log-level", "debug", "stats", "--metrics-url", dead)
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr and "ConnectionRefusedError" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1].startswith(f"vitcache stats: cannot reach {dead}")


def run_main(capfd: pytest.CaptureFixture[str], *argv: str) -> str:
    """``vitcache argv`` in this process: asserts it fails with exit code 2 and returns its message."""
    assert cli.main(list(argv)) == 2
    return message_of(capfd.readouterr().err)


def serve(*argv: str) -> tuple[str, ...]:
    return ("serve", "--port", "0", "--metrics-port", "0", *argv)


@pytest.fixture(scope="module")
def broken_checkpoints(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    no_vision, no_safetensors = root / "no_vision", root / "no_safetensors"
    for path in (no_vision, no_safetensors):
        path.mkdir()
        for file in tiny_checkpoint.iterdir():
            if file.name != "model.safetensors":
                (path / file.name).write_bytes(file.read_bytes())
    tensors = load_file(tiny_checkpoint / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "visual." not in k}, no_vision / "model.safetensors")
    return {"no_vision": no_vision, "no_safetensors": no_safetensors}


def test_serve_mistakes_end_in_a_line_that_says_what_to_do(capfd, tmp_path: Path, broken_checkpoints):
    message = run_main(capfd, *serve("--model", str(tmp_path / "nowhere")))
    assert message == (
        f"vitcache serve: model '{tmp_path / 'nowhere'}': no such directory; give a local Hugging Face checkpoint "
        "directory (config.json, *.safetensors, preprocessor_config.json) or 'tiny-random'"
    )
    message = run_main(capfd, *serve("--model", str(broken_checkpoints["no_vision"])))
    assert "has no vision weights (no tensor under visual., model.visual.)" in message
    assert "is it a complete qwen2_5_vl checkpoint, as its config.json says?" in message
    message = run_main(capfd, *serve("--model", str(broken_checkpoints["no_safetensors"])))
    assert "has no safetensors weights" in message and "safe_serialization=True" in message
    # Checked before the model loads: the model named here does not exist.
    message = run_main(capfd, *serve("--redis-url", ":secret@localhost:6379", "--model", str(tmp_path / "nowhere")))
    assert message.startswith("vitcache serve: bad Redis URL: ") and "write redis://HOST:PORT/DB" in message
    assert "secret" not in message


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="checks the error of a machine without a CUDA GPU")
def test_serve_on_a_cuda_device_that_is_not_there(capfd):
    """Every GPU (--device cuda) is counted before anything loads; a named one is found missing by its
    encoder process (the default on cuda), whose error comes back as it is."""
    message = run_main(capfd, *serve("--device", "cuda"))
    assert message.startswith("vitcache serve: --device cuda: no CUDA device is visible") and "cpu" in message
    message = run_main(capfd, *serve("--device", "cuda:0"))
    assert message.startswith("vitcache serve: device 'cuda:0': no CUDA GPU is visible here")
    assert "cpu" in message


def test_encode_mistakes(capfd, tmp_path: Path):
    message = run_main(capfd, "encode", str(tmp_path))
    assert message == f"vitcache encode: {tmp_path}: Is a directory"
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes(8, 8, seed=0))
    target = f"127.0.0.1:{free_port()}"
    message = run_main(capfd, "encode", str(image), "--target", target)
    assert message.startswith(f"vitcache encode: {target}: UNAVAILABLE: ")
    assert message.endswith("is `vitcache serve` running there?")
