"""docker-compose.yml, Prometheus and Grafana provisioning, checked without a Docker engine.

The structure is checked file by file, and every metric the Grafana panels query is looked up
in a live ``/metrics`` scrape of a real server that has served traffic.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from vitcache.client import VitCacheClient
from vitcache.server.metrics import GPU_METRICS

from vitcache.config import VitcacheConfig

from .conftest import png_bytes
from .test_metrics import scrape

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DASHBOARD = json.loads((ROOT / "deploy/grafana/dashboards/vitcache.json").read_text())
METRIC_NAME = re.compile(r"\b(?:vitcache|process)_[a-z0-9_]+\b")


def container_mounts(service: str) -> dict[str, Path]:
    """Container path -> host path (relative to the repository) of the service's bind mounts."""
    mounts = {}
    for volume in SERVICES[service].get("volumes", []):
        host, container, *_ = volume.split(":")
        mounts[container] = ROOT / host
    return mounts


def flag(service: str, name: str) -> str:
    values = [arg.split("=", 1)[1] for arg in SERVICES[service]["command"] if arg.startswith(f"{name}=")]
    assert len(values) == 1, f"{service} sets {name} {len(values)} times"
    return values[0]


def panel_queries() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in DASHBOARD["panels"] for target in panel["targets"]]


def test_compose_runs_redis_server_prometheus_and_grafana_wired_together() -> None:
    assert set(SERVICES) >= {"redis", "vitcache", "prometheus", "grafana"}
    for name, service in SERVICES.items():
        assert "build" in service or re.fullmatch(r"[\w./-]+:[\w.-]+", service["image"]), f"{name}: pin an image tag"
        assert not str(service.get("image", "")).endswith(":latest"), name
        depends = service.get("depends_on", [])
        assert set(depends) <= set(SERVICES), f"{name} depends on an unknown service"
        for container, host in container_mounts(name).items():
            if name != "vitcache":  # ./models is the user's checkpoint folder
                assert host.exists(), f"{name} mounts {host} at {container}, which is not in the repository"
    metrics_port = flag("vitcache", "--metrics-port")
    assert flag("vitcache", "--metrics-host") == "0.0.0.0"  # reachable from the Prometheus container
    assert f"{metrics_port}:{metrics_port}" in SERVICES["vitcache"]["ports"]
    assert flag("vitcache", "--redis-url").startswith("redis://redis:")

    prometheus_config_path = container_mounts("prometheus")["/etc/prometheus/prometheus.yml"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in SERVICES["prometheus"]["command"]
    scrape_configs = yaml.safe_load(prometheus_config_path.read_text())["scrape_configs"]
    (job,) = [job for job in scrape_configs if job["job_name"] == "vitcache"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"vitcache:{metrics_port}"]

    grafana = container_mounts("grafana")
    (datasource,) = yaml.safe_load((grafana["/etc/grafana/provisioning"] / "datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert "9090:9090" in SERVICES["prometheus"]["ports"]
    (provider,) = yaml.safe_load((grafana["/etc/grafana/provisioning"] / "dashboards/vitcache.yml").read_text())[
        "providers"
    ]
    dashboards_dir = provider["options"]["path"]
    assert (grafana[dashboards_dir] / "vitcache.json").is_file()
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/vitcache.json"

    # Every panel and query names the provisioned datasource.
    for panel in DASHBOARD["panels"]:
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]


def test_grafana_dashboard_is_well_formed() -> None:
    assert DASHBOARD["uid"] == "vitcache" and DASHBOARD["schemaVersion"] >= 36
    panels = DASHBOARD["panels"]
    assert len({p["id"] for p in panels}) == len(panels) >= 10
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        cells = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            for open_, close in ("()", "[]", "{}"):
                assert expr.count(open_) == expr.count(close), f"{panel['title']}: unbalanced {open_}{close}"
            assert METRIC_NAME.search(expr), f"{panel['title']}: queries no metric"
    # The panels the dashboard page has, by what they show.
    titles = " ".join(p["title"].lower() for p in panels)
    for shown in ("hit ratio", "throughput", "latency", "l1", "redis", "batch", "errors", "memory"):
        assert shown in titles, shown


def test_every_queried_metric_is_exported_by_a_live_server(start_server_thread, encoder, redis_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server_thread(VitcacheConfig.of(redis_url=redis_server.url, metrics_port=0), encoder)
    with VitCacheClient(server.target) as client:
        client.encode([png_bytes(56, 56, 300), png_bytes(84, 56, 301)])
        client.encode([png_bytes(56, 56, 300)])
    exported = {name for name, _ in scrape(server.running.metrics_port)}
    queried: dict[str, list[str]] = {}
    for title, expr in panel_queries():
        for name in METRIC_NAME.findall(expr):
            queried.setdefault(name, []).append(title)
    assert len(queried) >= 15
    missing = {
        name: titles for name, titles in queried.items() if name not in exported and name not in GPU_METRICS
    }  # GPU memory is exported only with a CUDA encoder (GPU_METRICS names it)
    assert not missing, f"panels query metrics the server does not export: {missing}"
    # Histogram quantiles read buckets; the panels never query a histogram by its bare name.
    for name in queried:
        if name.endswith("_bucket"):
            assert name.removesuffix("_bucket") + "_count" in exported
    assert set(GPU_METRICS) <= set(queried), "the memory panel shows GPU memory"


def test_redis_is_published_on_loopback_at_most() -> None:
    """The compose Redis has no AUTH: published on every host interface, anyone could write embeddings."""
    redis_services = [name for name, service in SERVICES.items() if str(service.get("image", "")).startswith("redis:")]
    assert "redis" in redis_services
    for name in redis_services:
        for mapping in SERVICES[name].get("ports", []):
            assert str(mapping).startswith("127.0.0.1:"), f"{name} publishes Redis beyond loopback: {mapping}"
