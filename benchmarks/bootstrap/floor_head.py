"""The floor's head side: wait for the local GCS port, then count alive nodes with one GCS
client every 100 ms; stamp ``$BENCH_OUT/ready`` when N are alive. Usage: floor_head.py N"""

import os
import socket
import sys
import time

n = int(sys.argv[1])
while True:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=0.2).close()
        break
    except OSError:
        time.sleep(0.05)
from ray._raylet import GcsClient  # noqa: E402 - only once the GCS answers

client = GcsClient(address="127.0.0.1:6379")
while sum(1 for v in client.get_all_node_info(timeout=2).values() if int(v.state) == 0) < n:
    time.sleep(0.1)
with open(os.path.join(os.environ["BENCH_OUT"], "ready"), "w") as f:
    print(time.time(), file=f)
