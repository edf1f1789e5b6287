"""Drives the end-to-end benchmark; see scripts/bench.sh. Standard library only."""
import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

PARTITIONS = 8


def sh(*args, **kwargs):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs).stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()
    except OSError:
        return ""


def counter(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith(name + "_"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def quantile(text, name, q, labels=""):
    """A quantile from a Prometheus histogram's cumulative buckets (upper bound)."""
    buckets = []
    for line in text.splitlines():
        if line.startswith(name + "_bucket{") and labels in line:
            bound = re.search(r'le="([^"]+)"', line).group(1)
            buckets.append((float("inf") if bound == "+Inf" else float(bound), float(line.rsplit(" ", 1)[1])))
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    buckets.sort()
    total = buckets[-1][1]
    for bound, count in buckets:
        if count >= q * total:
            return bound
    return float("inf")


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid):
    """User + system CPU time of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_worker(args, brokers, mysql, topic, group, table, redis_urls, end_sum, run_id, produce_live=None):
    """Runs one worker over the topic until its group has committed `end_sum` offsets.
    Returns its figures. `produce_live` (a command) is started once the worker is up, for
    the rate-limited latency run."""
    wait_for_innodb_quiet(mysql)
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "SYNC_KAFKA_BROKERS": brokers, "SYNC_KAFKA_TOPICS": topic, "SYNC_KAFKA_GROUP_ID": group,
        "SYNC_DLQ_TOPIC": f"{topic}_dlq", "SYNC_REDIS_URLS": redis_urls,
        "SYNC_REDIS_PREFIX": f"{run_id}:{group}:", "SYNC_SQL_URL": mysql, "SYNC_SQL_TABLE": table,
        "SYNC_METRICS_ADDR": f"127.0.0.1:{port}", "SYNC_MEMORY_BUDGET_BYTES": str(args.budget), "SYNC_L1_MAX_BYTES": str(args.l1),
        "SYNC_KAFKA_OPT_SESSION_TIMEOUT_MS": "6000", "SYNC_REVOKE_DEADLINE_MS": "4000",
        "SYNC_COMMIT_INTERVAL_MS": "200", "SYNC_LOG": "warn",
        "SYNC_WAL_DIR": f"/tmp/sync-engine-bench-wal-{run_id}-{group}",
    }
    # Any SYNC_* setting in the bench's environment tunes the worker (e.g. SYNC_BATCH_MAX_ITEMS).
    env.update({k: v for k, v in os.environ.items() if k.startswith("SYNC_") and not k.startswith("SYNC_TEST_")})
    merkle_lag = None
    worker = subprocess.Popen([args.binary, "run"], env=env)
    producer = None
    try:
        if produce_live:
            # Steady state: from the moment the worker owns its partitions (the group join
            # before it is startup, not settle latency).
            while counter(metrics(port), "sync_assigned_partitions") < PARTITIONS:
                if worker.poll() is not None:
                    raise SystemExit(f"the worker exited ({worker.returncode}) before its partitions were assigned")
                time.sleep(0.1)
            producer = subprocess.Popen(produce_live, stdout=subprocess.DEVNULL)
        first_consumed = None
        deadline = time.time() + 1800
        committed_sum = 0
        while time.time() < deadline:
            text = metrics(port)
            if first_consumed is None and counter(text, "sync_records_consumed_total") > 0:
                first_consumed = time.time()
            if first_consumed is not None:
                out = sh(args.binary, "offsets", "--brokers", brokers, "--group", group, "--topic", topic,
                         "--partitions", str(PARTITIONS))
                committed_sum = int(re.search(r"sum (-?\d+)", out).group(1))
                if committed_sum >= end_sum:
                    break
            time.sleep(0.1)
        done = time.time()
        text = metrics(port)
        # The merkle tree trails the rows by the marks not drained yet: how long until it is current.
        if is_local_mariadb(mysql) and os.environ.get("SYNC_MERKLE", "1") not in ("0", "false", "off", "no"):
            while time.time() < deadline:
                pending = local_mariadb(f"SELECT COUNT(*) FROM test.{table}_merkle_dirty").strip()
                if pending == "0":
                    merkle_lag = time.time() - done
                    break
                time.sleep(0.2)
        rss = peak_rss_mib(worker.pid)
        worker_cpu = cpu_seconds(worker.pid)
        with open(os.environ.get("BENCH_METRICS_OUT", f"/tmp/sync-engine-bench-metrics-{group}.txt"), "w") as out:
            out.write(text)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
        if producer:
            producer.wait(timeout=60)
    drop_tables(mysql, table)
    if committed_sum < end_sum:
        sys.exit(f"bench: {group} timed out, committed {committed_sum} of {end_sum}")
    elapsed = done - first_consumed
    return {
        "rate": args.items / elapsed, "elapsed": elapsed, "cpu": worker_cpu, "rss": rss, "exit": worker.returncode,
        "settle_p50": quantile(text, "sync_item_settle_seconds", 0.5) * 1000,
        "settle_p99": quantile(text, "sync_item_settle_seconds", 0.99) * 1000,
        "kafka_p50": quantile(text, "sync_settle_latency_seconds", 0.5) * 1000,
        "kafka_p99": quantile(text, "sync_settle_latency_seconds", 0.99) * 1000,
        "flush_p99": quantile(text, "sync_flush_duration_seconds", 0.99, 'tier="l3"') * 1000,
        "merkle_lag": merkle_lag,
    }


def is_local_mariadb(mysql):
    """Whether the bench's MariaDB is the local one scripts/services.sh runs, which the
    `mariadb` client reaches as root (the checks below need no password)."""
    return mysql.startswith("mysql://root@127.0.0.1")


def local_mariadb(statement):
    """Runs one statement through the `mariadb` client; its output, tab-separated, no header."""
    return subprocess.run(["mariadb", "-uroot", "-h127.0.0.1", "-N", "-e", statement], capture_output=True, text=True).stdout


def drop_tables(mysql, table):
    """Leave the database as we found it: a leftover 200 MB table slows every later run."""
    if is_local_mariadb(mysql):
        local_mariadb(f"DROP TABLE IF EXISTS test.{table}, test.{table}_migrations, test.{table}_merkle, test.{table}_merkle_dirty")


def wait_for_innodb_quiet(mysql, limit=60):
    """Starts every measure on an idle InnoDB: the pages the previous one dirtied (and the
    table it dropped) are written back in the background, and a measure that started during
    that write-back would pay for its predecessor. Waits, at most `limit` seconds, until the
    purge is done and either at most 5 % of the buffer pool is dirty or InnoDB has written no
    page for 2 s (its page cleaner wakes once a second; an idle InnoDB may keep a few hundred
    dirty pages for good)."""
    if not is_local_mariadb(mysql):
        return
    started = time.time()
    flushed_before, flushed_since = None, started
    while time.time() - started < limit:
        out = local_mariadb("SHOW GLOBAL STATUS WHERE Variable_name IN ('Innodb_buffer_pool_pages_flushed', "
                            "'Innodb_buffer_pool_pages_dirty', 'Innodb_buffer_pool_pages_total', 'Innodb_history_list_length')")
        status = {name: int(value) for name, value in (line.split("\t") for line in out.strip().splitlines() if "\t" in line)}
        flushed = status.get("Innodb_buffer_pool_pages_flushed", 0)
        if flushed != flushed_before:
            flushed_before, flushed_since = flushed, time.time()
        few_dirty = status.get("Innodb_buffer_pool_pages_dirty", 0) * 20 <= status.get("Innodb_buffer_pool_pages_total", 0)
        writing_stopped = time.time() - flushed_since >= 2
        if (few_dirty or writing_stopped) and status.get("Innodb_history_list_length", 0) < 100:
            break
        time.sleep(0.5)
    print(f"  (InnoDB quiet after {time.time() - started:.1f} s)", file=sys.stderr)


def produce(args, brokers, topic, workload, rate=0):
    return [args.binary, "produce", "--brokers", brokers, "--topic", topic, *workload, "--quiet",
            *(["--rate", str(int(rate))] if rate else [])]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--binary", default="target/release/sync-engine")
    parser.add_argument("--budget", type=int, default=128 << 20, help="SYNC_MEMORY_BUDGET_BYTES")
    parser.add_argument("--l1", type=int, default=32 << 20, help="SYNC_L1_MAX_BYTES")
    args = parser.parse_args()
    brokers = os.environ["SYNC_TEST_KAFKA_BROKERS"]
    mysql = os.environ["SYNC_TEST_MYSQL_URL"]
    cluster = os.environ.get("BENCH_REDIS_URLS", os.environ["SYNC_TEST_REDIS_URLS"])
    run_id = f"{int(time.time())}_{os.getpid()}"
    topic = f"bench_{run_id}"

    sh("scripts/create-topic.sh", topic, str(PARTITIONS))
    print(f"producing {args.items} items of 1 KiB to {topic} ({PARTITIONS} partitions)", file=sys.stderr)
    # The same workload flags for the worker's input and the L3 measures: the same rows.
    workload = ["--count", str(args.items), "--item-bytes", "1024", "--key-space", str(args.items * 20),
                "--id-prefix", f"bench.{run_id}", "--delete-share", "0.01", "--out-of-order-share", "0.01",
                "--duplicate-share", "0", "--seed", "7"]
    produced = sh(*produce(args, brokers, topic, workload))
    ends = {int(p): int(o) for p, o in re.findall(r"end offset partition=(\d+) offset=(\d+)", produced)}
    end_sum = sum(ends.values())

    l3_rates = {}
    for method in ["naive", "parallel", "load-data", "library"]:
        print(f"measuring L3 by {method}", file=sys.stderr)
        wait_for_innodb_quiet(mysql)
        out = sh(args.binary, "ceiling", "--sql-url", mysql, "--method", method, "--table", f"ceiling_{run_id}", *workload)
        l3_rates[method] = float(re.search(r"rows_per_sec=(\d+)", out).group(1))
    best_raw_method = max(["naive", "parallel", "load-data"], key=lambda m: l3_rates[m])
    best_raw, library = l3_rates[best_raw_method], l3_rates["library"]

    print("end to end through Kafka, L3 only", file=sys.stderr)
    l3_only = run_worker(args, brokers, mysql, topic, f"bench_{run_id}_l3", f"bench_{run_id}_l3", "", end_sum, run_id)
    print("end to end through Kafka, L3 + L2 (Redis Cluster)", file=sys.stderr)
    with_l2 = run_worker(args, brokers, mysql, topic, f"bench_{run_id}_l2", f"bench_{run_id}_l2", cluster, end_sum, run_id)

    # Latency at half the maximum rate: a second topic, produced live while the worker runs.
    half = with_l2["rate"] / 2
    live_topic = f"{topic}_live"
    sh("scripts/create-topic.sh", live_topic, str(PARTITIONS))
    print(f"latency run: producing live at {half:.0f} items/s (half the L3 + L2 rate)", file=sys.stderr)
    live = run_worker(args, brokers, mysql, live_topic, f"bench_{run_id}_rate", f"bench_{run_id}_rate", cluster,
                      end_sum, run_id, produce_live=produce(args, brokers, live_topic, workload, rate=half))
    # Leave the broker as we found it: a 1,000,000-item run's topics hold over 2 GB.
    sh("scripts/delete-topic.sh", topic, live_topic, f"{topic}_dlq", f"{live_topic}_dlq")

    print(f"items                  {args.items} (1 KiB, {PARTITIONS} partitions, same rows in every measure)")
    print("L3 alone (rows/s)")
    for method in ["naive", "parallel", "load-data"]:
        marker = "  <- best raw" if method == best_raw_method else ""
        print(f"  raw {method:<17} {l3_rates[method]:>8.0f}{marker}")
    print(f"  library path          {library:>8.0f}  (enqueue -> L3 settled, our engine, no Kafka)")
    print("end to end (items/s, first consumed -> last committed)")
    for label, run in [("Kafka -> L3", l3_only), ("Kafka -> L2 + L3", with_l2)]:
        print(f"  {label:<21} {run['rate']:>8.0f}  ({run['elapsed']:.1f} s; {run['cpu'] / args.items * 1e6:.0f} CPU us/item, "
              f"{run['cpu'] / run['elapsed']:.2f} cores; peak RSS {run['rss']:.0f} MiB)")
    print("ratios")
    print(f"  L3 only / library     {l3_only['rate'] / library:.2f}   (target >= 0.9)")
    print(f"  L3 only / best raw    {l3_only['rate'] / best_raw:.2f}   (target >= 0.8)")
    print(f"  L2 + L3 / L3 only     {with_l2['rate'] / l3_only['rate']:.2f}   (target >= 0.75)")
    print("latency")
    # With a backlog, Kafka -> settled is mostly time spent waiting in the topic: only the
    # live run's says what a record's latency is.
    print(f"  {'L2 + L3, backlog':<21} enqueue -> settled p50 <= {with_l2['settle_p50']:.0f} ms, "
          f"p99 <= {with_l2['settle_p99']:.0f} ms; L3 flush p99 <= {with_l2['flush_p99']:.0f} ms")
    print(f"  {f'L2 + L3 at {half:.0f}/s':<21} Kafka -> settled p50 <= {live['kafka_p50']:.0f} ms, "
          f"p99 <= {live['kafka_p99']:.0f} ms (target <= 250); enqueue -> settled p99 <= {live['settle_p99']:.0f} ms")
    # The pod's memory limit: budget for unsettled records + L1 + the fixed overhead.
    limit = (args.budget + args.l1 + (64 << 20)) >> 20
    worst = max(l3_only["rss"], with_l2["rss"], live["rss"])
    verdict = "within" if worst <= limit else "OVER"
    print(f"peak RSS               {worst:.0f} MiB, {verdict} budget {args.budget >> 20} + L1 {args.l1 >> 20} + 64 = {limit} MiB")
    print(f"worker exits           {l3_only['exit']}, {with_l2['exit']}, {live['exit']}")
    for label, run in [("L3 only", l3_only), ("L2 + L3", with_l2)]:
        if run["merkle_lag"] is not None:
            print(f"merkle tree current    {run['merkle_lag']:.1f} s after the last commit ({label}; every mark drained)")


if __name__ == "__main__":
    main()
