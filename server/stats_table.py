"""``vitcache stats``: the dashboard's numbers (``/api/stats``) as a terminal table."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class StatsRefused(Exception):
    """The metrics port wants a token (another one): says which."""


def fetch_stats(metrics_url: str, window_s: float, token: str | None = None, timeout_s: float = 5.0) -> dict[str, Any]:
    url = f"{metrics_url.rstrip('/')}/api/stats?window={window_s:g}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code not in (401, 403):
            raise
        reason = exc.read().decode(errors="replace").strip()
        raise StatsRefused(
            f"{url} refused: {reason}; pass --auth-token-file with a --metrics-token-file token "
            "or an --auth-token-file token bound to no tenant"
        ) from None


def format_stats(stats: dict[str, Any]) -> str:
    model, rates, hits, batch, totals = (
        stats["model"],
        stats["rates"],
        stats["hit_ratio"],
        stats["batch"],
        stats["totals"],
    )
    l1, redis = stats["l1"], stats["redis"]
    rows = [
        (
            "model",
            f"{model.get('model', '?')} ({model.get('family', '?')}, {model.get('dtype', '?')} on "
            f"{model.get('device', '?')}), up {_duration(stats['uptime_s'])}",
        ),
        (f"last {stats['window_s']:.1f} s", ""),
        (
            "  requests/s",
            f"{rates['requests_per_s']:.1f}   images/s {rates['images_per_s']:.1f}   "
            f"errors/s {rates['errors_per_s']:.1f}   forwards/s {rates['forwards_per_s']:.1f}",
        ),
        ("  hit ratio", f"{_pct(hits['overall'])}   L1 {_pct(hits['l1'])}   L2 {_pct(hits['l2'])}"),
        ("  batch", f"{_num(batch['images_mean'])} images, {_num(batch['patches_mean'])} patches per forward"),
        ("since start", ""),
        (
            "  images",
            f"{totals['images']:.0f}   L1 {totals['l1']:.0f}   L2 {totals['l2']:.0f}   "
            f"computed {totals['computed']:.0f}   hit ratio {_pct(totals['hit_ratio'])}",
        ),
        *_video_rows(stats.get("videos")),
        (
            "  requests",
            f"{totals['requests']:.0f}   in flight {stats['requests_in_flight']:.0f}   "
            f"forwards {totals['forwards']:.0f}",
        ),
        ("  digest lookups", f"{totals['lookups_not_found']:.0f} not found (hash-first, Fetch; not errors)"),
        ("  by error code", ", ".join(f"{code} {n:.0f}" for code, n in stats["errors_by_code"].items()) or "none"),
        (
            "L1",
            f"{_bytes(l1['bytes'])} of {_bytes(l1['capacity_bytes'])} ({_pct(l1['fill'])}), "
            f"{l1['entries']:.0f} entries, {l1['evictions']:.0f} evictions",
        ),
        (
            "Redis",
            (("connected" if redis["connected"] else "DISCONNECTED") if redis["enabled"] else "off (L1 only)")
            + f", {redis['errors']:.0f} errors, {redis['corrupt_entries']:.0f} corrupt entries",
        ),
    ]
    for gpu in stats.get("gpus", []):
        state = "" if gpu["alive"] else "DOWN (restarting), "
        rows.append(
            (
                f"encoder {gpu['device']}",
                f"{state}busy {_pct(gpu['busy_fraction'])} (forwards), {gpu['images_per_s']:.1f} img/s, "
                f"{gpu['restarts']:.0f} restarts"
                + (
                    f", memory {_bytes(gpu['allocated_bytes'])} allocated, {_bytes(gpu['reserved_bytes'])} reserved"
                    if gpu["device"].startswith("cuda")
                    else ""
                ),
            )
        )
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{label:<{width}}{value}".rstrip() for label, value in rows]
    quantiles = list(next(iter(stats["latency_ms"].values())))
    lines.append("")
    lines.append(
        f"{'latency (ms), last ' + format(stats['window_s'], '.1f') + ' s':<{width + 2}}"
        + "".join(f"{q:>10}" for q in quantiles)
    )
    for stage, values in stats["latency_ms"].items():
        lines.append(f"  {stage:<{width}}" + "".join(f"{_num(values[q], 3):>10}" for q in quantiles))
    return "\n".join(lines) + "\n"


def _pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.1f} %"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _video_rows(videos: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The clips among the images, once there were any (a server without videos keeps its table)."""
    if not videos or not videos["total"]:
        return []
    return [
        (
            "  of them videos",
            f"{videos['total']:.0f}   hit ratio {_pct(videos['hit_ratio_total'])}   "
            f"{videos['tokens']:.0f} tokens   {videos['per_s']:.1f}/s now",
        )
    ]
