"""Median time from `natcall call` to connected on loopback, over the release binaries.

Run from the repository root after `cargo build --release --workspace --bins`:
    python3 crates/bench/call_setup.py
"""
import subprocess, time, json, socket, statistics, tempfile, os
d=tempfile.mkdtemp()
s=socket.socket(); s.bind(("127.0.0.1",0)); port=s.getsockname()[1]; s.close()
B=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "target", "release") + "/"
srv=subprocess.Popen([B+"natcall-rendezvous","--listen",f"127.0.0.1:{port}","--log-level","warn","--ephemeral"],stderr=subprocess.DEVNULL)
time.sleep(0.5)
bob=subprocess.Popen([B+"natcall","--json","--server",f"127.0.0.1:{port}","--name","bob","--home",d+"/bob","listen"],stdin=subprocess.DEVNULL,stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL)
time.sleep(1)
walls=[];inproc=[];paths=[]
for i in range(20):
    t0=time.monotonic()
    p=subprocess.Popen([B+"natcall","--json","--server",f"127.0.0.1:{port}","--name","alice","--home",d+"/alice","call","bob"],stdin=subprocess.DEVNULL,stdout=subprocess.PIPE,stderr=subprocess.DEVNULL,text=True)
    for line in p.stdout:
        e=json.loads(line)
        if e["event"]=="connected":
            walls.append((time.monotonic()-t0)*1000); inproc.append(e["time_to_connected_ms"])
        if e["event"]=="report": paths.append(e["path"])
    p.wait()
print("wall spawn->connected ms: median %.1f min %.1f max %.1f"%(statistics.median(walls),min(walls),max(walls)))
print("in-process call->connected ms: median %.2f min %.2f max %.2f"%(statistics.median(inproc),min(inproc),max(inproc)))
print("paths at end:",set(paths), len(walls))
bob.kill(); srv.kill()
