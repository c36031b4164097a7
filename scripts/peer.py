#!/usr/bin/env python3
"""A small, faithful stand-in for ceilometer's collector, as the benchmark's peer.

It does per UDP datagram what ceilometer's collector did (ceilometer/collector.py's UDP loop,
the database dispatcher and the SQLAlchemy driver's record_metering_data), with nothing added:

  1. recvfrom(64 KiB) on a plain UDP socket (no SO_RCVBUF tuning; ceilometer did none);
  2. msgpack.unpackb(data, raw=False); undecodable datagrams are counted and dropped;
  3. verify_signature(): ceilometer's compute_signature (sorted recursive key pairs, HMAC-SHA256
     over str() of each value, lists through decode_unicode) compared with hmac.compare_digest;
  4. parse the ISO 8601 timestamp and normalize it to naive UTC (timeutils.normalize_time);
  5. record_metering_data(sample) in ONE transaction per message, as the SQLAlchemy driver's
     `with engine.begin()` did: look the meter up (insert if new), look the resource up by
     (resource_id, user_id, project_id, source, md5 of the sorted-keys JSON metadata) and
     insert it with its flattened metadata rows (dict_to_keyval into metadata_text/int/float/
     bool) if new, insert the sample, COMMIT. A UDP message is one sample, so one commit each.

Differences, all in the peer's favour: the sqlite3 module instead of SQLAlchemy Core (no
statement compilation per call), no oslo.log debug formatting, and SQLite in WAL mode with
synchronous=NORMAL (the collector's settings) instead of SQLite's rollback journal with FULL.

Usage: peer.py --db FILE --secret S [--address 127.0.0.1] [--port 0]
Prints "listening: udp HOST:PORT" once bound; on SIGTERM/SIGINT prints a JSON line of
counters and exits. `peer.py --self-test VECTORS.json` checks the signature code against
ceilometer's own vectors (crates/meter/tests/data/signatures.json).
"""

import argparse
import datetime
import hashlib
import hmac
import json
import signal
import socket
import sqlite3
import sys

# ---------------------------------------------------------------- ceilometer/publisher/utils.py


def decode_unicode(value):
    """ceilometer's decode_unicode: str -> bytes, bytes -> str, dicts rebuilt sorted."""
    if isinstance(value, dict):
        temp = {}
        for key, v in sorted(value.items()):
            temp[decode_unicode(key)] = decode_unicode(v)
        return temp
    if isinstance(value, (tuple, list)):
        return [decode_unicode(element) for element in value]
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


def recursive_keypairs(d, separator=":"):
    for name, value in sorted(d.items()):
        if isinstance(value, dict):
            for subname, subvalue in recursive_keypairs(value, separator):
                yield ("%s%s%s" % (name, separator, subname), subvalue)
        elif isinstance(value, (tuple, list)):
            yield name, decode_unicode(value)
        else:
            yield name, value


def compute_signature(message, secret):
    if not secret:
        return ""
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    digest_maker = hmac.new(secret, b"", hashlib.sha256)
    for name, value in recursive_keypairs(message):
        if name == "message_signature":
            continue
        digest_maker.update(str(name).encode("utf-8"))
        digest_maker.update(str(value).encode("utf-8"))
    return digest_maker.hexdigest()


def verify_signature(message, secret):
    if not secret:
        return True
    old_sig = message.get("message_signature", "")
    new_sig = compute_signature(message, secret)
    if isinstance(old_sig, str):
        try:
            old_sig = old_sig.encode("ascii")
        except UnicodeEncodeError:
            return False
    new_sig = new_sig.encode("ascii")
    return hmac.compare_digest(new_sig, old_sig)


# ---------------------------------------------------------------- ceilometer/utils.py


def dict_to_keyval(value, key_base=None):
    """Flatten nested metadata into 'a.b[0]' keys, as ceilometer's utils.dict_to_keyval."""
    val_iter, key_func = None, None
    if isinstance(value, dict):
        val_iter = value.items()
        key_func = lambda k: key_base + "." + k if key_base else k  # noqa: E731
    elif isinstance(value, (tuple, list)):
        val_iter = enumerate(value)
        key_func = lambda k: key_base + "[%d]" % k  # noqa: E731
    if val_iter:
        for k, v in val_iter:
            key_gen = key_func(k)
            if isinstance(v, (dict, tuple, list)):
                for key_gen2, v2 in dict_to_keyval(v, key_gen):
                    yield key_gen2, v2
            else:
                yield key_gen, v


def parse_isotime(text):
    """oslo timeutils.parse_isotime + normalize_time: naive UTC datetime."""
    t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is not None:
        t = t.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return t


def to_micros(t):
    delta = t - datetime.datetime(1970, 1, 1)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


# ---------------------------------------------------------------- the SQLAlchemy driver's model

SCHEMA = """
CREATE TABLE IF NOT EXISTS meter (
    id INTEGER PRIMARY KEY, name VARCHAR(255) NOT NULL, type VARCHAR(255), unit VARCHAR(255),
    UNIQUE (name, type, unit));
CREATE TABLE IF NOT EXISTS resource (
    internal_id INTEGER PRIMARY KEY, resource_id VARCHAR(255), user_id VARCHAR(255),
    project_id VARCHAR(255), source_id VARCHAR(255), resource_metadata TEXT,
    metadata_hash VARCHAR(32),
    UNIQUE (resource_id, user_id, project_id, source_id, metadata_hash));
CREATE INDEX IF NOT EXISTS ix_resource_resource_id ON resource (resource_id);
CREATE INDEX IF NOT EXISTS ix_resource_user_id ON resource (user_id);
CREATE INDEX IF NOT EXISTS ix_resource_project_id ON resource (project_id);
CREATE INDEX IF NOT EXISTS ix_resource_metadata_hash ON resource (metadata_hash);
CREATE TABLE IF NOT EXISTS sample (
    id INTEGER PRIMARY KEY, meter_id INTEGER REFERENCES meter (id),
    resource_id INTEGER REFERENCES resource (internal_id), volume FLOAT,
    timestamp INTEGER, recorded_at INTEGER, message_signature VARCHAR(64),
    message_id VARCHAR(128));
CREATE INDEX IF NOT EXISTS ix_sample_timestamp ON sample (timestamp);
CREATE INDEX IF NOT EXISTS ix_sample_resource_id ON sample (resource_id);
CREATE INDEX IF NOT EXISTS ix_sample_meter_id ON sample (meter_id);
CREATE INDEX IF NOT EXISTS ix_sample_meter_id_resource_id ON sample (meter_id, resource_id);
"""
for _t, _v in (("text", "TEXT"), ("int", "BIGINT"), ("float", "FLOAT"), ("bool", "BOOLEAN")):
    SCHEMA += (
        "CREATE TABLE IF NOT EXISTS metadata_%s (id INTEGER REFERENCES resource (internal_id),"
        " meta_key VARCHAR(255), value %s, PRIMARY KEY (id, meta_key));\n"
        "CREATE INDEX IF NOT EXISTS ix_meta_%s_key ON metadata_%s (meta_key);\n" % (_t, _v, _t, _t)
    )

# sql_utils.META_TYPE_MAP: bool before int (bool is an int in Python).
META_TABLE = {bool: "metadata_bool", str: "metadata_text", type(None): "metadata_text",
              int: "metadata_int", float: "metadata_float"}


class Storage:
    def __init__(self, path):
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, as engine.begin() does.
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(SCHEMA)

    def _create_meter(self, c, name, type_, unit):
        row = c.execute("SELECT id FROM meter WHERE name = ? AND type = ? AND unit = ?",
                        (name, type_, unit)).fetchone()
        if row:
            return row[0]
        return c.execute("INSERT INTO meter (name, type, unit) VALUES (?, ?, ?)",
                         (name, type_, unit)).lastrowid

    def _create_resource(self, c, res_id, user_id, project_id, source_id, rmeta):
        m_hash = hashlib.md5(json.dumps(rmeta, sort_keys=True).encode("utf-8")).hexdigest()
        row = c.execute(
            "SELECT internal_id FROM resource WHERE resource_id = ? AND user_id IS ? AND "
            "project_id IS ? AND source_id = ? AND metadata_hash = ?",
            (res_id, user_id, project_id, source_id, m_hash)).fetchone()
        if row:
            return row[0]
        internal_id = c.execute(
            "INSERT INTO resource (resource_id, user_id, project_id, source_id, "
            "resource_metadata, metadata_hash) VALUES (?, ?, ?, ?, ?, ?)",
            (res_id, user_id, project_id, source_id, json.dumps(rmeta), m_hash)).lastrowid
        if rmeta and isinstance(rmeta, dict):
            meta_map = {}
            for key, v in dict_to_keyval(rmeta):
                table = META_TABLE.get(type(v))
                if table is not None:
                    meta_map.setdefault(table, []).append((internal_id, key, v))
            for table, rows in meta_map.items():
                c.executemany("INSERT INTO %s (id, meta_key, value) VALUES (?, ?, ?)" % table, rows)
        return internal_id

    def record_metering_data(self, data):
        c = self.conn
        c.execute("BEGIN")
        try:
            m_id = self._create_meter(c, data["counter_name"], data["counter_type"],
                                      data["counter_unit"])
            res_id = self._create_resource(c, data["resource_id"], data["user_id"],
                                           data["project_id"], data["source"],
                                           data["resource_metadata"])
            now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
            c.execute(
                "INSERT INTO sample (meter_id, resource_id, timestamp, recorded_at, volume, "
                "message_signature, message_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (m_id, res_id, to_micros(data["timestamp"]), to_micros(now),
                 data["counter_volume"], data.get("message_signature"), data["message_id"]))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise


# ---------------------------------------------------------------- the collector's UDP loop


def serve(args):
    import msgpack  # only the serving path needs it (the self-test does not)

    storage = Storage(args.db)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    udp.bind((args.address, args.port))
    host, port = udp.getsockname()
    print("listening: udp %s:%d" % (host, port), flush=True)

    counters = {"received": 0, "malformed": 0, "invalid_signature": 0, "stored": 0, "errors": 0}
    running = [True]

    def stop(_signum, _frame):
        running[0] = False
        udp.close()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while running[0]:
        try:
            data, source = udp.recvfrom(64 * 1024)
        except OSError:
            break
        counters["received"] += 1
        try:
            sample = msgpack.unpackb(data, raw=False)
        except Exception:
            counters["malformed"] += 1
            continue
        if not verify_signature(sample, args.secret):
            counters["invalid_signature"] += 1
            continue
        try:
            if sample.get("timestamp"):
                sample["timestamp"] = parse_isotime(sample["timestamp"])
            storage.record_metering_data(sample)
            counters["stored"] += 1
        except Exception as e:  # ceilometer logged and went on with the next datagram
            counters["errors"] += 1
            if counters["errors"] == 1:
                print("peer: cannot store a sample: %r" % (e,), file=sys.stderr, flush=True)
    print(json.dumps(counters), flush=True)


def self_test(path):
    with open(path) as f:
        vectors = json.load(f)
    bad = 0
    for v in vectors:
        msg = v["message"]
        if "msgpack_hex" in v:
            try:
                import msgpack

                msg = msgpack.unpackb(bytes.fromhex(v["msgpack_hex"]), raw=False)
            except ImportError:
                pass  # JSON cannot tell 1 from 1.0; the vectors avoid relying on it mostly
        if not verify_signature(msg, v["secret"]):
            bad += 1
    print(json.dumps({"vectors": len(vectors), "failed": bad}))
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db")
    ap.add_argument("--secret", default="change this for valid signing")
    ap.add_argument("--address", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--self-test", metavar="VECTORS")
    args = ap.parse_args()
    if args.self_test:
        sys.exit(self_test(args.self_test))
    if not args.db:
        ap.error("--db is required")
    serve(args)


if __name__ == "__main__":
    main()
