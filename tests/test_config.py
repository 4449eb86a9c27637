"""The config tree (vitcache/config.py): every `vitcache serve` flag, its VITCACHE_<FLAG> variable
(flag beats variable beats default), bounds in one place, the generated --help and the README table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from vitcache.server import cli

from vitcache.config import VitcacheConfig, groups_of, settings_of
from vitcache.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"
FLAGS = [meta for _, group in groups_of() for _, meta, _ in settings_of(group)]


def failure(capfd: pytest.CaptureFixture[str], *argv: str) -> str:
    """``vitcache argv`` in this process: asserts exit code 2 and one line on stderr, and returns it."""
    assert cli.main(list(argv)) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_environment_variables_set_flags_and_flags_beat_them() -> None:
    args = cli.build_parser().parse_args(["serve", "--max-batch-wait-ms", "5", "--redis-url", "redis://flag:1/0"])
    environ = {
        "VITCACHE_MAX_BATCH_WAIT_MS": "7",  # the flag wins
        "VITCACHE_REDIS_URL": "redis://env:1/0",  # the flag wins
        "VITCACHE_REDIS_TTL": "60",
        "VITCACHE_FLEET_LOCK_TTL_MS": "0",  # 0 = no fleet lock
        "VITCACHE_ENCODER_PROCESS": "off",
        "VITCACHE_REDIS_CLUSTER": "true",
        "VITCACHE_L1_BYTES": "3MiB",
        "VITCACHE_WARMUP_IMAGE_SIZES": "448x448,64x32",
    }
    config = cli.serve_config(args, environ)
    assert config.batching.max_batch_wait_s == 0.005 and config.cache.redis_url == "redis://flag:1/0"
    assert config.cache.redis_ttl_s == 60 and config.cache.fleet_lock_ttl_s is None
    assert config.encoder.encoder_process is False and config.cache.redis_cluster is True
    assert config.cache.l1_bytes == 3 << 20 and config.model.warmup_image_sizes == ((448, 448), (64, 32))
    # Neither: the command's defaults (the library's, but metrics on at 9400).
    default = cli.serve_config(cli.build_parser().parse_args(["serve"]), {})
    assert default.metrics.metrics_port == 9400 and VitcacheConfig().metrics.metrics_port is None
    assert default.cache.fleet_lock_ttl_s == 10.0 and default.batching.max_batch_wait_s == 0.002
    assert default.encoder.encoder_restart_backoff_s == 1.0 and default.cache.redis_ttl_s is None
    assert default.model == VitcacheConfig().model and default.limits == VitcacheConfig().limits


def test_the_variable_reaches_serve_and_the_flag_beats_it(capfd, monkeypatch, tmp_path: Path) -> None:
    from_env, from_flag = tmp_path / "from-env", tmp_path / "from-flag"
    monkeypatch.setenv("VITCACHE_MODEL", str(from_env))
    monkeypatch.setenv("VITCACHE_MAX_BATCH_PATCHES", "0")  # out of bounds, but the flag's 64 wins
    serve = ("serve", "--port", "0", "--metrics-port", "0")
    assert failure(capfd, *serve, "--max-batch-patches", "64").startswith(f"vitcache serve: model '{from_env}'")
    line = failure(capfd, *serve, "--max-batch-patches", "64", "--model", str(from_flag))
    assert line.startswith(f"vitcache serve: model '{from_flag}'")


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("VITCACHE_PORT", "fifty", "VITCACHE_PORT='fifty': not an integer (as --port would take it)"),
        ("VITCACHE_MAX_BATCH_WAIT_MS", "soon", "VITCACHE_MAX_BATCH_WAIT_MS='soon': not a number"),
        ("VITCACHE_L1_BYTES", "2XB", "VITCACHE_L1_BYTES='2XB': not a byte size: '2XB' (try 512MiB or 2GiB)"),
        ("VITCACHE_ACCELERATION", "fast", "VITCACHE_ACCELERATION='fast': not one of auto, none, varlen"),
        ("VITCACHE_REDIS_CLUSTER", "maybe", "VITCACHE_REDIS_CLUSTER='maybe': not a boolean"),
        ("VITCACHE_MAX_BATCH_PATCHES", "0", "VITCACHE_MAX_BATCH_PATCHES='0': must be at least 1"),
        ("VITCACHE_PORT", "70000", "VITCACHE_PORT='70000': must be at most 65535"),
    ],
)
def test_a_bad_environment_value_is_one_line_naming_the_variable(capfd, monkeypatch, variable, value, says) -> None:
    monkeypatch.setenv(variable, value)
    assert failure(capfd, "serve").startswith(f"vitcache serve: {says}")


def test_bounds_are_checked_once_for_flags_and_library_users_alike(capfd) -> None:
    assert (
        failure(capfd, "serve", "--max-batch-wait-ms", "-1")
        == "vitcache serve: --max-batch-wait-ms=-1: must be at least 0"
    )
    assert failure(capfd, "serve", "--preprocess-workers", "0").endswith("--preprocess-workers=0: must be at least 1")
    assert failure(capfd, "serve", "--tls-cert", "c.pem") == "vitcache serve: --tls-cert and --tls-key go together"
    with pytest.raises(ConfigError, match=r"^--max-batch-patches=0: must be at least 1$"):
        VitcacheConfig.of(max_batch_patches=0)
    with pytest.raises(ConfigError, match=r"^--redis-timeout-ms=0.5: must be at least 1$"):
        VitcacheConfig.of(redis_timeout_s=0.0005)  # shown in the flag's unit
    with pytest.raises(ConfigError, match=r"^--acceleration='fast': not one of auto, none, varlen, compile, graphs$"):
        VitcacheConfig.of(acceleration="fast")
    with pytest.raises(TypeError, match="no such setting: max_batch_pixels"):
        VitcacheConfig.of(max_batch_pixels=1)
    assert VitcacheConfig.of(fleet_lock_ttl_s=None, port=0).cache.fleet_lock_ttl_s is None  # off is not out of bounds


def test_help_lists_every_flag_with_its_variable_and_default(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    for meta in FLAGS:
        assert meta.flag in text and f"[{meta.env_var}; default " in text, meta.flag
    for flag_and_default in (
        "--max-batch-patches MAX_BATCH_PATCHES patches in one vision forward [VITCACHE_MAX_BATCH_PATCHES; "
        "default 16384]",
        "[VITCACHE_MAX_BATCH_WAIT_MS; default 2 ms]",
        "[VITCACHE_L1_BYTES; default 2GiB]",
        "[VITCACHE_METRICS_PORT; default 9400]",
        "[VITCACHE_FLEET_LOCK_TTL_MS; default 10000 ms]",
        "[VITCACHE_ENCODER_RING_BYTES; default 512MiB]",
    ):
        assert flag_and_default in text


def test_the_readme_flags_table_matches_the_tree() -> None:
    """Every flag of the tree is in the table with the same default, and the table has no other."""
    section = README.read_text().split("## Flags (`vitcache serve`)", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| `--")]
    readme: dict[str, str] = {}
    for row in rows:
        flags = re.findall(r"`(--[a-z0-9-]+)`", row[0])
        defaults = [d.strip(" `") for d in row[1].split(",")] if "," in row[1] else [row[1].strip(" `")] * len(flags)
        assert len(defaults) == len(flags), row
        readme.update(zip(flags, defaults, strict=True))
    readme.pop("--log-level")  # the command's own, before `serve`
    tree = {meta.flag: meta.default_text(default) for _, g in groups_of() for _, meta, default in settings_of(g)}
    assert sorted(readme) == sorted(tree)
    words = {"false": "off"}
    for flag, default in tree.items():
        assert readme[flag].startswith(words.get(default, default)), (flag, readme[flag], default)


def test_client_side_variables_never_configure_the_server() -> None:
    """The SGLang plugin reads its client settings from the environment; none may be a ``vitcache serve`` variable,
    or a host running both would hand the server the client's certificate or token file."""
    plugin = (Path(__file__).resolve().parent.parent / "integrations" / "sglang_store.py").read_text()
    client_variables = set(re.findall(r"VITCACHE_[A-Z_]+", plugin))
    server_variables = {meta.env_var for _, group in groups_of() for _, meta, _ in settings_of(group)}
    assert {"VITCACHE_CLIENT_TARGET", "VITCACHE_CLIENT_TLS_CERT"} <= client_variables
    assert not client_variables & server_variables
