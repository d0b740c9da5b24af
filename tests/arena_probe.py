"""Run by test_deployment: load gunicorn_config.py, allocate from 8 threads at once, print glibc's arenas."""
import ctypes
import runpy
import sys
import threading

config = runpy.run_path(sys.argv[1])
print("cap", config["MALLOC_ARENAS"], flush=True)
barrier = threading.Barrier(8)
def work():
    barrier.wait()
    keep = [bytearray(64 * 1024) for _ in range(200)]
    barrier.wait()
    del keep
threads = [threading.Thread(target=work) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
ctypes.CDLL("libc.so.6").malloc_stats()  # one "Arena N:" block per arena, on stderr
