#!/usr/bin/env python3
"""Write tests/data/reference_vectors.json: random, deliberately awkward messages signed by a
Python model of ceilometer's signature, to check our Python str()/repr() rendering against
Python itself (unicode, quotes, control characters, bytes, floats of every magnitude).

The model follows ceilometer's publisher/utils.py compute_signature and utils.py
recursive_keypairs/decode_unicode as described in shared/vectors/README.md; the vectors that
real ceilometer produced are in signatures.json. Needs `pip install msgpack`; deterministic:

    python3.12 tools/gen_reference_vectors.py > tests/data/reference_vectors.json
"""
import hashlib
import hmac
import json
import random
import struct

import msgpack


def swap_text(value):
    """ceilometer's decode_unicode: str -> bytes, bytes -> str, dicts rebuilt sorted."""
    if isinstance(value, dict):
        out = {}
        for k, v in sorted(value.items()):
            out[swap_text(k)] = swap_text(v)
        return out
    if isinstance(value, (list, tuple)):
        return [swap_text(v) for v in value]
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


def keypairs(d):
    for name, value in sorted(d.items()):
        if isinstance(value, dict):
            for sub, subvalue in keypairs(value):
                yield "%s:%s" % (name, sub), subvalue
        elif isinstance(value, (list, tuple)):
            yield name, swap_text(value)
        else:
            yield name, value


def signature(message, secret):
    if not secret:
        return ""
    mac = hmac.new(secret.encode("utf-8"), b"", hashlib.sha256)
    for name, value in keypairs(message):
        if name == "message_signature":
            continue
        mac.update(str(name).encode("utf-8"))
        mac.update(str(value).encode("utf-8"))
    return mac.hexdigest()


rng = random.Random(20261101)

NASTY_CHARS = (
    "a", "Z", "0", " ", "'", '"', "\\", "\t", "\n", "\r", "\x00", "\x1f", "\x7f", "\x80",
    "\x85", "\xa0", "\xad", "\xe9", "\xff", "\u0378", "\u2028", "\u200b", "\u2713", "\ufeff",
    "\uffff", "\U0001f600", "\U000e0001", "\U0010ffff", "\u4e2d", "\u0301", "\U00013430",
)


def rand_text():
    n = rng.choice((0, 1, 2, 3, 5, 8))
    return "".join(rng.choice(NASTY_CHARS) for _ in range(n))


def rand_bytes(utf8_only):
    if utf8_only or rng.random() < 0.6:
        return rand_text().encode("utf-8")
    return bytes(rng.randrange(256) for _ in range(rng.randrange(6)))


def rand_float():
    r = rng.random()
    if r < 0.3:
        return struct.unpack(">d", rng.getrandbits(64).to_bytes(8, "big"))[0]
    if r < 0.5:
        return rng.choice((0.0, -0.0, 1.0, 1.5, 0.1, 1e-4, 1e-5, 9.999e-5, 1e15, 1e16,
                           9999999999999998.0, 1e22, 5e-324, 2.2250738585072014e-308,
                           1.7976931348623157e308, float("inf"), float("-inf"), float("nan")))
    if r < 0.8:
        return rng.uniform(-1, 1) * 10 ** rng.randrange(-8, 20)
    return float(rng.randrange(-10**6, 10**6)) / rng.choice((1, 2, 4, 10, 100, 3))


def rand_int():
    return rng.choice((0, 1, -1, 127, 128, -32, -33, 255, 256, 2**31, -2**31 - 1, 2**63 - 1,
                       -2**63, 2**63, 2**64 - 1, rng.randrange(-10**12, 10**12)))


def rand_scalar(in_list):
    kind = rng.randrange(8)
    if kind == 0:
        return rand_text()
    if kind == 1:
        return rand_bytes(utf8_only=not in_list or rng.random() < 0.9)
    if kind == 2:
        return rand_int()
    if kind == 3:
        return rand_float()
    if kind == 4:
        return rng.choice((True, False))
    if kind == 5:
        return None
    return rand_text()


def rand_key(kind):
    if kind == "bytes":
        return rand_text().encode("utf-8") + bytes([rng.randrange(256)])
    return rand_text() + rng.choice(("k", "key", "x", "\xe9", "\U0001f600"))


def rand_dict(depth, in_list):
    kind = "bytes" if rng.random() < 0.15 else "str"
    out = {}
    for _ in range(rng.randrange(0, 5)):
        out[rand_key(kind)] = rand_value(depth + 1, in_list)
    if rng.random() < 0.03:
        # A mix of str and bytes keys: Python cannot sort it, so there is no signature.
        out[b"bytes-key"] = 1
        out["str-key"] = 2
    return out


def rand_list(depth):
    return [rand_value(depth + 1, True) for _ in range(rng.randrange(0, 5))]


def rand_value(depth, in_list):
    r = rng.random()
    if depth < 4 and r < 0.2:
        return rand_dict(depth, in_list)
    if depth < 4 and r < 0.35:
        return rand_list(depth)
    return rand_scalar(in_list)


def rand_message():
    m = {
        "source": "openstack",
        "counter_name": rand_text() or "x",
        "counter_volume": rng.choice((rand_int(), rand_float())),
        "resource_metadata": rand_dict(1, False),
    }
    for _ in range(rng.randrange(0, 4)):
        m[rand_key("str")] = rand_value(1, False)
    return m


SECRETS = ("change this for valid signing", "s\xe9cr\u20ac t", "k")

vectors = []
for i in range(160):
    message = rand_message()
    secret = SECRETS[i % len(SECRETS)]
    try:
        sig = signature(message, secret)
    except (TypeError, UnicodeDecodeError):
        sig = None
    message["message_signature"] = sig if sig is not None else "0" * 64
    packed = msgpack.packb(message, use_bin_type=True)
    vectors.append({"secret": secret, "msgpack_hex": packed.hex(), "signature": sig})

floats = []
for _ in range(1500):
    f = rand_float()
    floats.append([struct.pack(">d", f).hex(), repr(f)])

print(json.dumps({"messages": vectors, "floats": floats}, indent=0))
