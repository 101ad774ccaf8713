"""Control traffic on loopback: tokens, the fake Braze's counts, the gateway's /metrics.

The load itself comes from bench/load.py; these are the few requests run.py makes to watch.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

from procs import HOST
from prometheus_client.parser import text_string_to_metric_families

CLIENT_ID = "didomi"


def http(url: str, data: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    if urllib.parse.urlsplit(url).hostname != HOST:
        raise ValueError(f"the benchmark only talks to {HOST}, not {url}")
    request = urllib.request.Request(url, data=data)  # noqa: S310 - checked: http to loopback
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def token(base: str, secret: str) -> str:
    form = urllib.parse.urlencode(
        {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": secret}
    ).encode()
    status, body = http(base + "/oauth/token", form)
    if status != 200:
        raise RuntimeError(f"token request to {base} failed: {status} {body[:200]!r}")
    return str(json.loads(body)["access_token"])


def braze_stats(url: str) -> dict[str, int]:
    return dict(json.loads(http(url + "/_stats")[1]))


Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(base: str) -> Samples:
    """Every sample of the gateway's /metrics, by sample name."""
    samples: Samples = {}
    text = http(base + "/metrics")[1].decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        value
        for have, value in samples.get(name, [])
        if all(have.get(k) == v for k, v in labels.items())
    )


def histogram_quantile(samples: Samples, name: str, q: float) -> float | None:
    """Prometheus' histogram_quantile: linear inside the bucket holding the q-th observation."""
    buckets = sorted(
        (float(labels["le"]), value) for labels, value in samples.get(name + "_bucket", [])
    )
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower  # beyond the last finite bound: all we can say is "at least"
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = upper, count
    return lower
