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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--binary", default="target/release/sync-engine")
    parser.add_argument("--budget", type=int, default=128 << 20, help="SYNC_MEMORY_BUDGET_BYTES")
    parser.add_argument("--l1", type=int, default=32 << 20, help="SYNC_L1_MAX_BYTES")
    args = parser.parse_args()
    brokers = os.environ["SYNC_TEST_KAFKA_BROKERS"]
    mysql = os.environ["SYNC_TEST_MYSQL_URL"]
    run_id = f"{int(time.time())}_{os.getpid()}"
    topic, group, table = f"bench_{run_id}", f"bench_{run_id}", f"bench_{run_id}"

    sh("scripts/create-topic.sh", topic, str(PARTITIONS))
    print(f"producing {args.items} items of 1 KiB to {topic} ({PARTITIONS} partitions)", file=sys.stderr)
    # The same workload flags for the worker's input and the ceiling: the same rows.
    workload = ["--count", str(args.items), "--item-bytes", "1024", "--key-space", str(args.items * 20),
                "--id-prefix", f"bench.{run_id}", "--delete-share", "0.01", "--out-of-order-share", "0.01",
                "--duplicate-share", "0", "--seed", "7"]
    produced = sh(args.binary, "produce", "--brokers", brokers, "--topic", topic, *workload, "--quiet")
    ends = {int(p): int(o) for p, o in re.findall(r"end offset partition=(\d+) offset=(\d+)", produced)}
    end_sum = sum(ends.values())

    print("measuring the raw MariaDB ceiling (plain multi-row upserts, 1,000 rows per statement)", file=sys.stderr)
    ceiling_out = sh(args.binary, "ceiling", "--sql-url", mysql, *workload)
    ceiling = float(re.search(r"rows_per_sec=(\d+)", ceiling_out).group(1))

    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "SYNC_KAFKA_BROKERS": brokers, "SYNC_KAFKA_TOPICS": topic, "SYNC_KAFKA_GROUP_ID": group,
        "SYNC_DLQ_TOPIC": f"{topic}_dlq", "SYNC_REDIS_URLS": os.environ.get("BENCH_REDIS_URLS", os.environ["SYNC_TEST_REDIS_URLS"]),
        "SYNC_REDIS_PREFIX": f"{run_id}:", "SYNC_SQL_URL": mysql, "SYNC_SQL_TABLE": table,
        "SYNC_METRICS_ADDR": f"127.0.0.1:{port}", "SYNC_MEMORY_BUDGET_BYTES": str(args.budget), "SYNC_L1_MAX_BYTES": str(args.l1),
        "SYNC_KAFKA_OPT_SESSION_TIMEOUT_MS": "6000", "SYNC_REVOKE_DEADLINE_MS": "4000",
        "SYNC_COMMIT_INTERVAL_MS": "200", "SYNC_LOG": "warn",
        "SYNC_WAL_DIR": f"/tmp/sync-engine-bench-wal-{run_id}",
    }
    # Any SYNC_* setting in the bench's environment tunes the worker (e.g. SYNC_BATCH_MAX_ITEMS).
    env.update({k: v for k, v in os.environ.items() if k.startswith("SYNC_") and not k.startswith("SYNC_TEST_")})
    merkle_lag = None
    worker = subprocess.Popen([args.binary, "run"], env=env)
    try:
        first_consumed = None
        deadline = time.time() + 900
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
        if mysql.startswith("mysql://root@127.0.0.1") and os.environ.get("SYNC_MERKLE", "1") not in ("0", "false", "off", "no"):
            while time.time() < deadline:
                pending = subprocess.run(["mariadb", "-uroot", "-h127.0.0.1", "-N", "-e", f"SELECT COUNT(*) FROM test.{table}_merkle_dirty"],
                                         capture_output=True, text=True).stdout.strip()
                if pending == "0":
                    merkle_lag = time.time() - done
                    break
                time.sleep(0.2)
        rss = peak_rss_mib(worker.pid)
        worker_cpu = cpu_seconds(worker.pid)
        with open(os.environ.get("BENCH_METRICS_OUT", "/tmp/sync-engine-bench-metrics.txt"), "w") as out:
            out.write(text)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    # Leave the database as we found it: a leftover 200 MB table slows every later run.
    subprocess.run(["mariadb", "-uroot", "-h127.0.0.1", "-e", f"DROP TABLE IF EXISTS test.{table}, test.{table}_migrations, test.{table}_merkle, test.{table}_merkle_dirty"],
                   capture_output=True) if mysql.startswith("mysql://root@127.0.0.1") else None
    if committed_sum < end_sum:
        sys.exit(f"bench: timed out, committed {committed_sum} of {end_sum}")
    elapsed = done - first_consumed
    rate = args.items / elapsed
    print(f"items                  {args.items} (1 KiB, {PARTITIONS} partitions, L2 + L3)")
    print(f"end-to-end             {rate:.0f} items/s ({elapsed:.1f} s, first consumed -> last committed)")
    print(f"raw MariaDB ceiling    {ceiling:.0f} rows/s")
    print(f"ratio                  {rate / ceiling:.2f}")
    print(f"item settle latency    p50 <= {quantile(text, 'sync_item_settle_seconds', 0.5) * 1000:.0f} ms, "
          f"p99 <= {quantile(text, 'sync_item_settle_seconds', 0.99) * 1000:.0f} ms (enqueue -> durable)")
    l3 = 'tier="l3"'
    print(f"L3 batch flush         p50 <= {quantile(text, 'sync_flush_duration_seconds', 0.5, l3) * 1000:.0f} ms, "
          f"p99 <= {quantile(text, 'sync_flush_duration_seconds', 0.99, l3) * 1000:.0f} ms")
    print(f"worker CPU             {worker_cpu:.1f} s user+system over the run ({worker_cpu / elapsed:.2f} cores)")
    # The pod's memory limit: budget for unsettled records + L1 + the fixed overhead stated in
    # tests/process.rs (binary, librdkafka, pools).
    limit = (args.budget + args.l1 + (96 << 20)) >> 20
    verdict = "within" if rss <= limit else "OVER"
    print(f"peak RSS               {rss:.0f} MiB, {verdict} the {limit} MiB limit "
          f"(budget {args.budget >> 20} + L1 {args.l1 >> 20} + 96 overhead)")
    print(f"worker exit            {worker.returncode}")
    if merkle_lag is not None:
        print(f"merkle tree current    {merkle_lag:.1f} s after the last commit (every mark drained)")


if __name__ == "__main__":
    main()
