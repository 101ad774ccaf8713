"""The table run.py prints, from the report it collected."""

from __future__ import annotations

from typing import Any


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _mb(size: float) -> str:
    return f"{size / 2**20:.1f} MB"


def cpu_us(row: dict[str, Any]) -> float:
    """Server CPU microseconds per accepted webhook: steadier than rates on a shared machine."""
    return float(row["cpu"]["server"]) / 100 * row["elapsed_s"] / max(1, row["accepted"]) * 1e6


def _intake(r: dict[str, Any]) -> list[str]:
    gw, ceil = r["gateway"], r["ceiling"]
    lines = [
        "1. intake                    webhooks/s  p50 ms  p99 ms  server CPU  CPU µs/webhook"
        "  load CPU"
    ]
    for label, row in (("gateway (durable spool)", gw), ("ceiling (bare aiohttp 202)", ceil)):
        lines.append(
            f"   {label:<26} {row['accepted_per_s']:>8.0f} {_ms(row['p50_ms']):>7} "
            f"{_ms(row['p99_ms']):>7} {row['cpu']['server']:>9.0f} % {cpu_us(row):>15.0f}"
            f" {row['cpu_percent']:>8.0f} %"
        )
    ratio = gw["accepted_per_s"] / ceil["accepted_per_s"] if ceil["accepted_per_s"] else 0.0
    lines.append(
        f"   gateway / ceiling          {100 * ratio:>7.0f} %   target >= 60 %: "
        f"{_verdict(ratio >= 0.6)}; CPU per webhook {cpu_us(gw) / max(cpu_us(ceil), 1e-9):.1f} x"
    )
    for label, row in (("gateway", gw), ("ceiling", ceil)):
        if row["errors"]:
            lines.append(f"   {label} errors: {row['errors']}")
    return lines


def _end_to_end(r: dict[str, Any]) -> list[str]:
    gw, naive, e2e = r["gateway"], r["naive"], r["e2e"]
    naive_rate = naive["braze_objects"] / naive["elapsed_s"] if naive["elapsed_s"] else 0.0
    e2e_ratio = e2e["updates_per_s"] / gw["accepted_per_s"] if gw["accepted_per_s"] else 0.0
    p50, p99 = e2e["delivery_p50_s"], e2e["delivery_p99_s"]
    delivery = "-" if p50 is None or p99 is None else f"{1000 * p50:.0f} / {1000 * p99:.0f} ms"
    naive_ms = f"{_ms(naive['p50_ms'])} / {_ms(naive['p99_ms'])} ms (inside the response)"
    vs_naive = f"{e2e['updates_per_s'] / naive_rate:.1f} x" if naive_rate else "-"
    lines = [
        "2. end to end                   updates/s   objects/request   delivery p50 / p99",
        f"   gateway                     {e2e['updates_per_s']:>10.0f} "
        f"{e2e['objects_per_request']:>17.1f}   {delivery}",
        f"   naive forwarder             {naive_rate:>10.0f} {1.0:>17.1f}   {naive_ms}",
        f"   gateway / naive             {vs_naive:>11}",
        f"   end to end / intake         {100 * e2e_ratio:>9.0f} %    target >= 90 %: "
        f"{_verdict(e2e_ratio >= 0.9)}",
        f"   objects per Braze request   {e2e['objects_per_request']:>11.1f}    target >= 70: "
        f"{_verdict(e2e['objects_per_request'] >= 70)}",
        f"   {e2e['delivered']:.0f} of {e2e['accepted']:.0f} accepted updates acknowledged in "
        f"{e2e['braze_requests']} Braze requests ({e2e['braze_rate_limited']} answered 429), "
        f"the last {e2e['drain_s']:.1f} s after the load stopped"
        + ("" if e2e["drained"] else f"; NOT drained: {e2e['left_pending']:.0f} left")
        + (
            f"; gateway_spool_pending read 0 only {e2e['gauge_lag_s']:.1f} s later"
            if (e2e["gauge_lag_s"] or 0) > 0.5
            else ""
        ),
        f"   CPU during load: gateway {gw['cpu']['server']:.0f} % + fake Braze "
        f"{gw['cpu']['braze']:.0f} %; naive {naive['cpu']['server']:.0f} % + fake Braze "
        f"{naive['cpu']['braze']:.0f} % + load {naive['cpu_percent']:.0f} %",
    ]
    if naive["errors"]:
        lines.append(f"   naive forwarder errors: {naive['errors']}")
    return lines


def _mapping(r: dict[str, Any]) -> list[str]:
    rows = r["mapping"]["results"]
    costs = [row["apply_us"] for row in rows]
    flat = max(costs) <= 1.5 * min(costs)
    heads = [f"{row['rules']:,} rules" for row in rows]
    cells = [
        f"{row['apply_us']:.2f}".rjust(len(head)) for row, head in zip(rows, heads, strict=True)
    ]
    return [
        "3. mapping cost (RuleSet.apply)   " + "   ".join(heads),
        "   µs per event                   " + "   ".join(cells),
        f"   flat (largest <= 1.5 x smallest): {_verdict(flat)}; decoding one event costs "
        f"{r['mapping']['decode_us']:.1f} µs, whatever the rules",
    ]


def _footprint(r: dict[str, Any]) -> list[str]:
    held, after = r["spool_held"], r["spool_after_delivery"]
    held_bytes = held["db"] + held.get("-wal", 0)
    stored = max(1, held["inbox"])
    lines = [
        "4. footprint",
        f"   gateway RSS                 idle {r['rss_idle_kb'] / 1024:.0f} MB, peak "
        f"{r['rss_peak_kb'] / 1024:.0f} MB (VmHWM), {r['rss_after_kb'] / 1024:.0f} MB after",
        f"   spool per 100,000 pending   {_mb(held_bytes * 100_000 / stored)}  "
        f"({held['inbox']:,} held while Braze was down: {_mb(held_bytes)}, file + WAL)",
        f"   kept per 100,000 delivered  {_mb(after['live'] * 100_000 / max(1, after['seen']))}  "
        f"({after['seen']:,} dedupe keys, {after['applied']:,} applied times)",
    ]
    if r["held"]["errors"]:
        lines.append(f"   errors while Braze was down: {r['held']['errors']}")
    return lines


def table(r: dict[str, Any]) -> str:
    a = r["args"]
    limit = f"{a['rate_limit']} per 3 s" if a["rate_limit"] else "none"
    head = (
        f"didomi-braze-gateway benchmark: {r['nproc']} cores, {a['seconds']:g} s per run at "
        f"concurrency {a['concurrency']}, fake Braze latency {a['latency_ms']:g} ms, "
        f"rate limit {limit}"
    )
    parts = [[head], _intake(r), _end_to_end(r), _mapping(r), _footprint(r)]
    return "\n\n".join("\n".join(part) for part in parts)


def _cpu(row: dict[str, Any], name: str) -> str:
    if name == "postgres" and row["key"] == "sqlite":
        return "-"
    seconds = row["load_cpu_s"] if name == "load" else row["cpu_s"][name]
    return f"{100 * seconds / row['window_s']:.0f}"


def _replica_rows(r: dict[str, Any]) -> list[str]:
    lines = [
        "5. replicas          intake: webhooks/s  p50 ms  p99 ms   end to end: webhooks/s"
        "  e2e/intake  server µs/webhook   CPU % of a core: gateways postgres load braze",
    ]
    for row in r["replicas"]:
        server = row["cpu_s"]["gateways"] + row["cpu_s"]["postgres"]
        cpu = "  ".join(
            _cpu(row, name).rjust(width)
            for name, width in (("gateways", 8), ("postgres", 8), ("load", 4), ("braze", 5))
        )
        lines.append(
            f"   {row['label']:<24} {row['intake_per_s']:>8.0f} {_ms(row['p50_ms']):>7} "
            f"{_ms(row['p99_ms']):>7} {row['e2e_per_s']:>16.0f} "
            f"{100 * row['e2e_per_s'] / max(row['intake_per_s'], 1e-9):>10.0f} % "
            f"{1e6 * server / max(1, row['accepted']):>16.0f}   {' ' * 14}{cpu}"
        )
    for row in r["replicas"]:
        notes = [
            f"{row['accepted']:,} accepted, all at Braze {row['drain_s']:.1f} s after the load"
        ]
        if not row["delivered"]:
            notes = [f"{row['accepted']:,} accepted, NOT all at Braze"]
        if not row["spool"]["empty"]:
            notes.append("spool NOT empty 15 s later")
        lag = row["spool"]["gauges_zero_after_s"]
        if lag is None:
            notes.append(f"gateway_spool_pending still {row['spool']['gauges']} 15 s later")
        elif lag > 0.5:
            notes.append(f"gateway_spool_pending read 0 {lag:.1f} s later")
        if row["errors"]:
            notes.append(f"errors {row['errors']}")
        if row["log_problems"]:
            notes.append(f"{len(row['log_problems'])} warning/error log lines")
        if any(code != 0 for code in row["exits"]):
            notes.append(f"exit codes {row['exits']}")
        lines.append(f"   {row['label']:<24} " + "; ".join(notes))
    return lines


def _kill(r: dict[str, Any]) -> list[str]:
    k = r["kill"]
    ok = k["most_per_1s"] <= k["rate"] + 1
    lost = k["missing"] + k["stale"]
    taken = k["leases_taken_s"]
    resumed = k["resumed_s"]
    lines = [
        f"6. kill -9 of one of 2 PostgreSQL replicas under load (requests_per_second "
        f"{k['rate']:g}, batch_size {k['batch_size']}, lease_s {k['lease_s']:g})",
        f"   sent              {k['webhooks']:,} webhooks ({k['persons']:,} persons, 2 choices "
        f"each) to both replicas alternately; the kill {k['killed_after_s']:.1f} s in, "
        f"{k['stored_at_kill']:,.0f} stored by then "
        f"({k['stored_at_kill'] / max(k['killed_after_s'], 1e-9):,.0f}/s), "
        f"{k['pending_at_kill']:,} waiting in the spool",
        f"   accepted          {k['acked']:,} of {k['webhooks']:,} ({k['first_pass_acked']:,} "
        f"acknowledged in the first pass, {k['resent']:,} resent to the survivor, "
        f"{k['resent_duplicates']:,} of them answered 200 duplicate)",
        f"   delivered         {k['at_latest']:,} of {k['persons']:,} persons at their latest "
        f"choice in Braze; lost {lost} ({k['missing']} never arrived, {k['stale']} at an older "
        f"choice); {k['inbox_left']} left in the spool, {k['dead_letters']} dead letters",
        "   takeover          "
        + ("leases NOT all taken" if taken is None else f"{taken:.1f} s to hold all 64 leases")
        + (
            f", {resumed:.1f} s to the first delivery of the dead replica's "
            f"{k['dead_partitions']} partitions"
            if resumed is not None
            else ", no delivery of the dead replica's partitions seen"
        )
        + " (from the kill); logged 'partition leases: 64 held of 64': "
        + ("yes" if k["logged_takeover"] else "NO"),
        f"   Braze rate        at most {k['most_per_1s']} requests in any 1 s window, limit "
        f"{k['rate']:g} (+1): {_verdict(ok)}; at most {k['most_per_5s']} in any 5 s "
        f"(limit {5 * k['rate'] + 1:g}); 1 s: {k['most_per_1s_both']} while both delivered, "
        f"{k['most_per_1s_survivor']} after the kill; "
        f"{k['braze_requests']} requests "
        f"({k['braze_429']} answered 429) in {k['done_s']:.1f} s",
        f"   exits             killed replica {k['victim_exit']}, survivor {k['survivor_exit']}",
    ]
    if k["log_problems"]:
        lines.append(f"   replica logs      {len(k['log_problems'])} warning/error lines, first:")
        lines += [f"     {line[:160]}" for line in k["log_problems"][:5]]
    return lines


def replicas_table(r: dict[str, Any]) -> str:
    """The table of `run.py --replicas`."""
    a = r["args"]
    limit = f"{a['rate_limit']} per 3 s" if a["rate_limit"] else "none"
    head = (
        f"didomi-braze-gateway replicas benchmark: {r['nproc']} cores, {a['seconds']:g} s per "
        f"run at concurrency {a['concurrency']}, fake Braze latency {a['latency_ms']:g} ms, "
        f"rate limit {limit}; PostgreSQL fsync on"
    )
    return "\n\n".join("\n".join(part) for part in ([head], _replica_rows(r), _kill(r)))
