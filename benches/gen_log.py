#!/usr/bin/env python3
"""Write a valid hash-chained audit log of N events into CMM_HOME (bench input).

usage: gen_log.py CMM_HOME N
Lines follow the format in src/audit.rs: prev = sha256 of the previous
line's bytes; audit.head records the last line's seq, hash and offsets.
"""
import hashlib
import json
import os
import sys
from datetime import datetime, timedelta, timezone

home, n = sys.argv[1], int(sys.argv[2])
os.makedirs(home, mode=0o700, exist_ok=True)
prev = "0" * 64
log_id = os.urandom(16).hex()
start = datetime.now(timezone.utc) - timedelta(days=90)
offset = 0
last_start = 0
models = ["sonnet", "opus", "haiku"]
with open(os.path.join(home, "audit.jsonl"), "wb") as f:
    for seq in range(n):
        ts = (start + timedelta(seconds=seq * 7)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        if seq == 0:
            body = '"event":"log.genesis","log_id":"%s"' % log_id
        elif seq % 2:
            body = '"event":"job.started","job_id":"j%d","model":"%s","prompt_sha256":"%s"' % (
                seq, models[seq % 3], hashlib.sha256(str(seq).encode()).hexdigest())
        else:
            body = ('"event":"job.completed","job_id":"j%d","model":"%s","duration_ms":%d,'
                    '"usage":{"input_tokens":%d,"output_tokens":%d,"cache_creation_input_tokens":0,'
                    '"cache_read_input_tokens":%d,"total_tokens":%d}') % (
                seq - 1, models[seq % 3], 1000 + seq % 5000, 100, 50, 10, 160)
        line = '{"v":1,"seq":%d,"ts":"%s",%s,"prev":"%s"}' % (seq, ts, body, prev)
        b = line.encode()
        f.write(b + b"\n")
        prev = hashlib.sha256(b).hexdigest()
        last_start = offset
        offset += len(b) + 1
os.chmod(os.path.join(home, "audit.jsonl"), 0o600)
# The file as the last append left it (docs/FORMAT.md, audit.head): taken
# after the chmod, which moves ctime too.
st = os.stat(os.path.join(home, "audit.jsonl"))
stamp = {"dev": st.st_dev, "ino": st.st_ino, "ctime": st.st_ctime_ns // 10**9,
         "ctime_nsec": st.st_ctime_ns % 10**9, "len": st.st_size}
with open(os.path.join(home, "audit.head"), "w") as f:
    json.dump({"log_id": log_id, "seq": n - 1, "hash": prev, "last_start": last_start, "len": offset,
               "file": stamp}, f)
os.chmod(os.path.join(home, "audit.head"), 0o600)
