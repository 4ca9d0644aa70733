"""Turn the raw samples into the verdicts, `results.md`, `results.json` and `results.png`.

Every figure is a median over repeated, interleaved runs with its p95 beside it, and every
comparison is a ratio between backends measured in the same run, so a slower or busier
machine moves the numbers but much less the ratios the targets are about.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy

MIB = 1 << 20
JUICEFS = ("jfs-sqlite", "jfs-s3", "jfs-pg")
S3_VOLUMES = ("jfs-s3", "jfs-pg")  # their data in S3; the embedded volume's is in a local folder
LATENCY_NOTE = (
    "Latency in the cloud-like profile is emulated by a userspace TCP delay proxy (`bench/proxy.py`) placed in "
    "front of the S3 server ({s3} ms each way) and Redis and PostgreSQL ({redis} ms each way), because this machine's kernel has no "
    "`sch_netem`, so `tc netem` is unavailable. It is a fair stand-in for what the profile asks: like netem's delay, "
    "the proxy holds every chunk of bytes for a fixed time in each direction, so each request/response exchange costs "
    "one more round trip and a new connection one more (the TCP handshake), while bandwidth stays that of loopback. "
    "It does not emulate packet loss or a bandwidth cap, which the profile does not ask for either; it costs some CPU "
    "on loopback, which makes the cloud profile's large-result throughput a lower bound for all backends alike. "
    "The round trips it produces were measured in the run (table below)."
)


def median(values: list[float]) -> float:
    return float(numpy.median(values))


def p95(values: list[float]) -> float:
    return float(numpy.percentile(values, 95))


@dataclass(frozen=True)
class Verdict:
    target: str
    profile: str
    measured: str
    passed: bool


# A small hit's time, at most this many times a hit on local disk (the floor), per profile.
SMALL_HIT_TIMES_LOCAL = {"loopback": 1.3, "cloud": 2.0}
# Operations a small hit in a new process makes on the mount (JuiceFS's `.accesslog`).
MAX_FUSE_OPS = 12


def _operations(counted: dict) -> str:
    return f"{counted['total']} (" + ", ".join(f"{kind} {n}" for kind, n in counted["by_kind"].items()) + ")"


def verdicts(results: dict) -> list[Verdict]:
    found: list[Verdict] = []
    for profile, data in results["profiles"].items():
        s = data["samples"]
        names = data["backends"]
        volumes = [slug for slug in JUICEFS if slug in names]
        local_hit = median(s["small_hit"]["local"])
        most = SMALL_HIT_TIMES_LOCAL[profile]
        for slug in volumes:
            ratio = median(s["small_hit"][slug]) / local_hit
            found.append(Verdict(f"{names[slug]} small hit <= {most}x local disk", profile,
                                 f"{median(s['small_hit'][slug]) * 1000:.1f} ms = {ratio:.2f}x{_entry_file(s, slug)}", ratio <= most))
        if profile == "cloud" and "jfs-s3" in names:
            ours = median(s["small_hit"]["jfs-s3"])
            for other, least in (("s3fs", 5), ("s3-direct", 6)):
                factor = median(s["small_hit"][other]) / ours
                # The floor: how much faster than it a hit on local disk is, in the same run.
                floor = median(s["small_hit"][other]) / local_hit
                found.append(Verdict(f"JuiceFS Redis+S3 small hit >= {least}x faster than {names[other]}", profile,
                                     f"{factor:.1f}x faster (local disk: {floor:.1f}x faster)", factor >= least))
        for slug, places in data.get("fuse_ops", {}).items():
            for where, counted in places.items():
                found.append(Verdict(f"{names[slug]} small hit in a new process, {where}: <= {MAX_FUSE_OPS} operations on the mount",
                                     profile, _operations(counted), counted["total"] <= MAX_FUSE_OPS))
        for mib in results["meta"]["plan"]["sizes_mib"]:
            for slug in volumes:
                for what, least in (("write", 0.6), ("hit", 0.25)):
                    task_metric, raw_metric, _ = STAGES[what]
                    share = median(s[f"{raw_metric}_{mib}"][slug]) / median(s[f"{task_metric}_{mib}"][slug])
                    stages = _stages(s, slug, mib, what)
                    found.append(Verdict(f"{names[slug]} {mib} MiB {what} >= {least:.0%} of {_raw(what)}",
                                         profile, f"{share:.0%}{stages}", share >= least))
        for slug in volumes:
            warm = median(s["warm_hit_small"][slug])
            ratio = median(s["cold_hit_small"][slug]) / warm
            # A cold hit on an S3 volume must fetch its one object: a warm hit plus an S3 round trip at best.
            fetch = f" (a warm hit plus one S3 round trip: {(warm + data['rtt_ms']['s3'] / 1000) / warm:.2f}x)" if slug in S3_VOLUMES else ""
            found.append(Verdict(f"{names[slug]} cold hit from a second client <= 2x a warm hit", profile,
                                 f"{median(s['cold_hit_small'][slug]) * 1000:.1f} ms = {ratio:.2f}x{fetch}", ratio <= 2))
        local_wall = data["contention"]["local"]["wall_seconds"]
        for slug in volumes:
            outcome = data["contention"][slug]
            ok = outcome["computations"] == 1 and outcome["wall_seconds"] <= 4
            found.append(Verdict(f"{names[slug]}: 8 concurrent same-key runs compute once, wall <= 4 s", profile,
                                 f"{outcome['computations']} computation(s), {outcome['wall_seconds']:.2f} s "
                                 f"(local disk: {local_wall:.2f} s)", ok))
        floor = median(s["import_prefect"]["python"])
        local_over = _over_import(s, "local")  # the same run on local disk: Prefect's own share
        for slug in volumes:
            e2e, over = median(s["e2e_hit"][slug]), _over_import(s, slug)
            found.append(Verdict(f"{names[slug]} cached `main.py` run (server running) <= import prefect + 0.5 s", profile,
                                 f"{over:+.2f} s over import prefect in the same round (local disk: {local_over:+.2f} s; "
                                 f"medians: hit {e2e:.2f} s, import {floor:.2f} s)", over <= 0.5))
        levels = sorted(int(m.rsplit("_", 1)[1]) for m in s if m.startswith("scale_hit_"))
        if levels:
            local_low, local_high = _scale_medians(s, levels, "local")  # the same fill on local disk: the machine's drift
            for slug in [v for v in volumes if v in s[f"scale_hit_{levels[0]}"]]:  # not PostgreSQL: see worker.scale
                low, high = _scale_medians(s, levels, slug)
                found.append(Verdict(f"{names[slug]} hit at {levels[-1]:,} entries <= 1.2x at {levels[0]:,}", profile,
                                     f"{high * 1000:.1f} ms vs {low * 1000:.1f} ms = {high / low:.2f}x "
                                     f"(local disk: {local_high / local_low:.2f}x)", high / low <= 1.2))
    return found


def _scale_medians(s: dict, levels: list[int], slug: str) -> tuple[float, float]:
    """A small hit's median with the fewest and with the most entries in the folders."""
    return median(s[f"scale_hit_{levels[0]}"][slug]), median(s[f"scale_hit_{levels[-1]}"][slug])


def _over_import(s: dict, slug: str) -> float:
    """Median excess of a cached `main.py` run over `import prefect` timed in the same round."""
    return median([hit - floor for hit, floor in zip(s["e2e_hit"][slug], s["import_prefect"]["python"], strict=True)])


# A large hit's and a large write's stages, timed alone outside Prefect (`Bench.hit_stages`,
# `Bench.write_stages`), with how the verdicts name them, and the task and raw metrics they split.
STAGES = {
    "hit": ("task_read", "raw_read", {"read": "file read into new memory", "check": "check", "unpickle": "unpickle"}),
    "write": ("task_write", "raw_write", {"pickle": "pickle", "hash": "hash", "file": "file write and fsync"}),
}


def _stage_ms(s: dict, slug: str, mib: int, what: str) -> dict[str, float]:
    """Medians in ms: the task, each stage, the rest (Prefect's work, and the record: the task
    less its stages, round by round, as each round times both), and the mount's raw warm read
    or write of as many bytes."""
    task_metric, raw_metric, stages = STAGES[what]
    tasks = s[f"{task_metric}_{mib}"][slug]
    timed = {stage: s[f"{what}_{stage}_{mib}"][slug] for stage in stages}
    rest = [task - sum(parts) for task, *parts in zip(tasks, *timed.values(), strict=True)]
    return {"task": median(tasks) * 1000, **{stage: median(values) * 1000 for stage, values in timed.items()},
            "rest": median(rest) * 1000, "raw": median(s[f"{raw_metric}_{mib}"][slug]) * 1000}


def _stages(s: dict, slug: str, mib: int, what: str) -> str:
    """Where the task's time went: what limits a large-result verdict."""
    ms, labels = _stage_ms(s, slug, mib, what), STAGES[what][2]
    timed = ", ".join(f"{label} {ms[stage]:.0f}" for stage, label in labels.items())
    return f" ({what} {ms['task']:.0f} ms: {timed}, the rest {ms['rest']:.0f}; {_raw(what)} {ms['raw']:.0f} ms)"


def _raw(what: str) -> str:
    """The mount's own operation a large hit or write is measured against."""
    return "raw read" if what == "hit" else "raw write"


def _entry_file(s: dict, slug: str) -> str:
    """What the hit's one entry file costs to open, read and close on its own, against local disk."""
    ours, local = median(s["entry_file_small"][slug]), median(s["entry_file_small"]["local"])
    return f" (its entry file alone: {ours * 1000:.2f} ms, local disk {local * 1000:.2f} ms)"


def postgres_vs_redis(data: dict) -> str | None:
    """PostgreSQL against Redis as the metadata engine, same run, same S3: the small-result hit and miss."""
    s = data["samples"]
    if "jfs-pg" not in data["backends"] or "jfs-s3" not in data["backends"]:
        return None
    hit_pg, hit_redis = median(s["small_hit"]["jfs-pg"]), median(s["small_hit"]["jfs-s3"])
    miss_pg, miss_redis = median(s["small_miss"]["jfs-pg"]), median(s["small_miss"]["jfs-s3"])
    return (f"PostgreSQL metadata vs Redis: small hit {hit_pg * 1000:.1f} ms vs {hit_redis * 1000:.1f} ms = "
            f"{hit_pg / hit_redis:.2f}x; miss+write {miss_pg * 1000:.1f} ms vs {miss_redis * 1000:.1f} ms = {miss_pg / miss_redis:.2f}x")


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    found = verdicts(results)
    results["verdicts"] = [v.__dict__ for v in found]
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results, found))
    plot(results, out / "results.png")
    print()
    for verdict in found:
        print(f"{'PASS' if verdict.passed else 'MISS'}  [{verdict.profile}] {verdict.target}: {verdict.measured}")
    for profile, data in results["profiles"].items():
        if (line := postgres_vs_redis(data)) is not None:
            print(f"INFO  [{profile}] {line}")


def _ms(values: list[float]) -> str:
    return f"{median(values) * 1000:.1f} | {p95(values) * 1000:.1f}"


def _rate(mib: int, values: list[float]) -> float:
    return mib / median(values)


def markdown(results: dict, found: list[Verdict]) -> str:
    meta = results["meta"]
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `make bench` (`python -m bench{' --quick' if meta['quick'] else ''}`) on {meta['date']}, "
        f"in {meta['seconds'] // 60} min {meta['seconds'] % 60} s.",
        "",
        f"- Machine: {meta['machine']}; shared with other work, so expect noise: compare the ratios, measured in the same run.",
        "- Versions: " + ", ".join(f"{name} {version}" for name, version in meta["versions"].items()) + ".",
        "- Every service ran on this machine on loopback: redis-server, PostgreSQL, SeaweedFS (S3, with SigV4 auth), "
        "a Prefect server, the JuiceFS and s3fs-fuse mounts.",
        f"- {LATENCY_NOTE.format(s3=meta['delays_ms']['s3_one_way'], redis=meta['delays_ms']['redis_one_way'])}",
        "- Timings are task-level (one task run through Prefect's engine inside a flow), medians with p95, "
        "backends interleaved in a rotating order. Prefect's in-memory record cache is emptied before each timed hit, "
        "and juicecache's stores remember no record between runs, so a hit reads storage as the next run (a new "
        "process, another host) would.",
        "",
        "## Targets",
        "",
        "| | target | profile | measured |",
        "|---|---|---|---|",
        *(f"| {'PASS' if v.passed else '**MISS**'} | {v.target} | {v.profile} | {v.measured} |" for v in found),
        "",
    ]
    for profile, data in results["profiles"].items():
        s, names = data["samples"], data["backends"]
        rtt = data["rtt_ms"]
        lines += [
            f"## Profile: {profile}",
            "",
            f"Measured round trip: S3 {rtt['s3']:.2f} ms, Redis {rtt['redis']:.2f} ms.",
            "",
            "### Small result (ms)",
            "",
            "| backend | hit median | hit p95 | hit / local | entry file alone | miss+write median | miss p95 | miss / local |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for slug, name in names.items():
            hit, miss = s["small_hit"][slug], s["small_miss"][slug]
            alone = f"{median(s['entry_file_small'][slug]) * 1000:.2f}" if slug in s["entry_file_small"] else "-"
            lines.append(
                f"| {name} | {_ms(hit)} | {median(hit) / median(s['small_hit']['local']):.2f}x | {alone} | "
                f"{_ms(miss)} | {median(miss) / median(s['small_miss']['local']):.2f}x |"
            )
        lines += ["", "Entry file alone: `open`, `fstat`, `read` and `close` of one small entry (what a hit does on the "
                  "mount), the process idle for 10 ms before each, as a hit is after the run's other work."]
        if (line := postgres_vs_redis(data)) is not None:
            lines += ["", f"{line} (same run, same S3)."]
        for mib in meta["plan"]["sizes_mib"]:
            lines += [
                "",
                f"### {mib} MiB result (MiB/s, medians)",
                "",
                "| backend | raw write | task write (% raw) | raw read, first | task hit, first | raw read, warm | "
                "task hit, warm (% raw) | task hit / local |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for slug, name in names.items():
                raw_w, task_w = _rate(mib, s[f"raw_write_{mib}"][slug]), _rate(mib, s[f"task_write_{mib}"][slug])
                raw_r, task_r = _rate(mib, s[f"raw_read_{mib}"][slug]), _rate(mib, s[f"task_read_{mib}"][slug])
                local_r = _rate(mib, s[f"task_read_{mib}"]["local"])
                lines.append(
                    f"| {name} | {raw_w:.0f} | {task_w:.0f} ({task_w / raw_w:.0%}) | "
                    f"{_rate(mib, s[f'raw_read_first_{mib}'][slug]):.0f} | {_rate(mib, s[f'task_read_first_{mib}'][slug]):.0f} | "
                    f"{raw_r:.0f} | {task_r:.0f} ({task_r / raw_r:.0%}) | {task_r / local_r:.2f}x |"
                )
        lines += [
            "",
            "### Where a large result's time goes (ms, medians)",
            "",
            "Each stage timed alone, outside Prefect, as the store does it: a hit's payload file read into new memory, "
            "checked (BLAKE3) and unpickled; a write's result pickled, hashed, written and fsynced. The result is one "
            "`bytes` object: a hit reads it straight into the object it returns and a write takes it as it is, so "
            "nothing is unpickled or pickled (0 ms). The rest is Prefect's work for the task run, and the small "
            "record. The raw read and write move the same bytes through one reused buffer.",
            "",
            "| backend | size | hit | read | check | unpickle | the rest | raw read | write | pickle | hash | "
            "write+fsync | the rest | raw write |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for mib in meta["plan"]["sizes_mib"]:
            for slug, name in names.items():
                if slug in s[f"hit_read_{mib}"]:  # the folder backends, not Prefect's own S3 storage
                    cells = [f"{ms[k]:.0f}" for what in STAGES for ms in [_stage_ms(s, slug, mib, what)]
                             for k in ("task", *STAGES[what][2], "rest", "raw")]
                    lines.append(f"| {name} | {mib} MiB | " + " | ".join(cells) + " |")
        volumes = [slug for slug in JUICEFS if slug in names]
        lines += [
            "",
            "### Second client: cold hit on another mount of the same volume (its own cache)",
            "",
            "| backend | warm hit, first mount (ms) | cold hit, second mount (ms) | cold / warm | "
            "64 MiB warm (MiB/s) | 64 MiB cold (MiB/s) |",
            "|---|---|---|---|---|---|",
        ]
        for slug in volumes:
            warm, cold = s["warm_hit_small"][slug], s["cold_hit_small"][slug]
            lines.append(
                f"| {names[slug]} | {median(warm) * 1000:.1f} | {median(cold) * 1000:.1f} (p95 {p95(cold) * 1000:.1f}) | "
                f"{median(cold) / median(warm):.2f}x | {_rate(64, s['warm_hit_64'][slug]):.0f} | {_rate(64, s['cold_hit_64'][slug]):.0f} |"
            )
        lines += [
            "",
            "### 8 concurrent runs of one new key (the task takes 3 s)",
            "",
            "| backend | computations | wall (s) | task run states |",
            "|---|---|---|---|",
        ]
        for slug, name in names.items():
            outcome = data["contention"][slug]
            states = ", ".join(f"{outcome['states'].count(x)} {x}" for x in sorted(set(outcome["states"])))
            lines.append(f"| {name} | {outcome['computations']} | {outcome['wall_seconds']:.2f} | {states} |")
        lines += [
            "",
            "### End to end: `python main.py -input ...`, a cache hit (process wall time, s)",
            "",
            "| what | median | p95 |",
            "|---|---|---|",
            f"| `python -c \"import prefect\"` (the floor) | {median(s['import_prefect']['python']):.2f} | "
            f"{p95(s['import_prefect']['python']):.2f} |",
        ]
        for slug, values in s["e2e_hit"].items():
            lines.append(f"| hit on {names[slug]}, Prefect server running (+{_over_import(s, slug):.2f} over the round's "
                         f"import) | {median(values):.2f} | {p95(values):.2f} |")
        for slug, values in s.get("e2e_hit_no_server", {}).items():
            lines.append(f"| hit on {names[slug]}, no server (Prefect starts a temporary one) | {median(values):.2f} | {p95(values):.2f} |")
        levels = sorted(int(m.rsplit("_", 1)[1]) for m in s if m.startswith("scale_hit_"))
        if levels:
            fill = data["facts"].get("scale_fill_seconds", {})
            lines += [
                "",
                "### Hit latency as the cache grows (ms, median; entries per folder)",
                "",
                "| backend | " + " | ".join(f"{level:,}" for level in levels) + " |",
                "|---|" + "---|" * len(levels),
            ]
            for slug in s[f"scale_hit_{levels[0]}"]:
                cells = " | ".join(f"{median(s[f'scale_hit_{level}'][slug]) * 1000:.1f}" for level in levels)
                lines.append(f"| {names[slug]} | {cells} |")
            lines.append("")
            lines.append("Filling (all three backends, empty filler entries in records/ and data/): "
                         + ", ".join(f"{int(k):,}: {v} s" for k, v in fill.items()) + ".")
        facts = data["facts"]
        entry = facts["entry_64mib"]
        lines += [
            "",
            "### Checked facts",
            "",
            f"- Files a hit reads: {json.dumps(facts['reads_per_hit'])} (Prefect's reads, counted on one hit). With "
            "`key_storage`, Prefect reads the small record twice (its existence check, then the read) and the payload "
            "once; without it, the existence check would read and parse the whole payload too. juicecache reads the "
            "entry once (one file for a small result, which travels inside its record; the record and the payload file "
            "for a larger one), before Prefect asks (to decide that the run is a hit and needs no lock), and answers "
            "Prefect's reads from what it checked.",
            f"- A 64 MiB result (pickle: {entry['pickle_bytes'] / MIB:.1f} MiB) is a {entry['data_file_bytes'] / MIB:.1f} MiB "
            f"entry file with serializer `{entry['serializer']}`, plus a {entry['record_file_bytes']} byte record.",
            f"- On this CPU, BLAKE3 (the digest of new entries) runs at {facts['blake3_mib_per_s']:.0f} MiB/s, SHA-256 "
            f"(entries written before it) at {facts['sha256_mib_per_s']:.0f} MiB/s, and a base64 encode+decode round trip "
            f"at {facts['base64_roundtrip_mib_per_s']:.0f} MiB/s.",
            "",
        ]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    profiles = list(results["profiles"])
    first = results["profiles"][profiles[0]]
    slugs, names = list(first["backends"]), first["backends"]
    figure, (hits, large) = pyplot.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(profiles)
    for index, profile in enumerate(profiles):
        s = results["profiles"][profile]["samples"]
        xs = [i + (index - (len(profiles) - 1) / 2) * width for i in range(len(slugs))]
        med = [median(s["small_hit"][slug]) * 1000 for slug in slugs]
        top = [p95(s["small_hit"][slug]) * 1000 - m for slug, m in zip(slugs, med, strict=True)]
        bars = hits.bar(xs, med, width, yerr=[[0] * len(med), top], capsize=3, label=f"{profile} profile")
        hits.bar_label(bars, labels=[f"{m:.0f}" if m >= 10 else f"{m:.1f}" for m in med], fontsize=8)
        mib = max(results["meta"]["plan"]["sizes_mib"])
        rates = [_rate(mib, s[f"task_read_{mib}"][slug]) for slug in slugs]
        bars = large.bar(xs, rates, width, label=f"{profile}: task hit")
        raws = [_rate(mib, s[f"raw_read_{mib}"][slug]) for slug in slugs]
        large.scatter(xs, raws, marker="_", s=400, color="black", zorder=3, label="raw read of the mount" if index == 0 else None)
    hits.set_yscale("log")
    hits.set_ylabel("ms (median, whisker: p95)")
    hits.set_title("Small-result cache hit, task level (lower is better)")
    large.set_yscale("log")
    large.set_ylabel("MiB/s (median, log scale)")
    large.set_title(f"{max(results['meta']['plan']['sizes_mib'])} MiB result, warm hit vs raw read (higher is better)")
    for axes in (hits, large):
        axes.set_xticks(range(len(slugs)), [names[slug].replace(" (", "\n(") for slug in slugs], fontsize=8)
        axes.legend(fontsize=8)
        axes.grid(axis="y", alpha=0.3)
    figure.suptitle(f"juicecache benchmark, {results['meta']['date']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
